"""ShieldGemma 2 policy choice: names, custom definitions, order, and one clear error for each mistake."""

from __future__ import annotations

import pytest

from mlx_gemma3 import Gemma3Error
from mlx_gemma3.processing.shield_prompt import DEFAULT_POLICIES, policy_definitions


def test_all_policies_in_order_custom_ones_added_or_overriding():
    assert list(policy_definitions()) == ["dangerous", "sexual", "violence"]
    chosen = policy_definitions(None, {"cats": "No cats.", "sexual": "No nudity."})
    assert list(chosen) == ["dangerous", "sexual", "violence", "cats"]
    assert chosen["sexual"] == "No nudity." and chosen["violence"] == DEFAULT_POLICIES["violence"]
    assert policy_definitions(["cats", "dangerous"], {"cats": "No cats."}) == {
        "cats": "No cats.",
        "dangerous": DEFAULT_POLICIES["dangerous"],
    }


@pytest.mark.parametrize(
    "policies, custom, message",
    [
        (["weapons"], None, "unknown policy 'weapons': the policies are dangerous, sexual, violence"),
        ([], None, "no policy to check"),
        ("violence", None, "must be a list of policy names"),
        (None, {"cats": " "}, "custom policy 'cats': give a non-empty name and a non-empty description"),
    ],
)
def test_policy_mistakes_are_one_clear_error(policies, custom, message):
    with pytest.raises(Gemma3Error, match=message):
        policy_definitions(policies, custom)
