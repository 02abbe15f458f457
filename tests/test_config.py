"""Config parsing against transformers' own reading of the same config.json dicts."""

from __future__ import annotations

import pytest

from mlx_gemma3 import Gemma3Error
from mlx_gemma3.model.config import parse_config

HUB_4B_LEGACY = {  # the shape of google/gemma-3-4b-it's config.json: text_config omits class defaults
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "mm_tokens_per_image": 256,
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "vision_config": {"model_type": "siglip_vision_model"},
    "torch_dtype": "bfloat16",
    "eos_token_id": [1, 106],
    "some_future_key": {"ignored": True},
}
HUB_27B_TEXT = {
    "model_type": "gemma3_text",
    "hidden_size": 5376,
    "intermediate_size": 21504,
    "num_hidden_layers": 62,
    "num_attention_heads": 32,
    "num_key_value_heads": 16,
    "head_dim": 128,
    "query_pre_attn_scalar": 168,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024,
    "sliding_window_pattern": 6,
    "vocab_size": 262208,
}


def transformers_text_config(raw: dict):
    from transformers import Gemma3Config, Gemma3TextConfig

    if raw["model_type"] == "gemma3":
        return Gemma3Config(**{k: v for k, v in raw.items() if k != "some_future_key"}).text_config
    return Gemma3TextConfig(**raw)


@pytest.mark.parametrize("raw", [HUB_4B_LEGACY, HUB_27B_TEXT], ids=["4b_multimodal_legacy", "27b_text_legacy"])
def test_matches_transformers_reading(raw):
    ours = parse_config(raw).text
    ref = transformers_text_config(raw)
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "sliding_window",
        "max_position_embeddings",
    ):
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.query_pre_attn_scalar == ref.query_pre_attn_scalar
    assert ours.rms_norm_eps == ref.rms_norm_eps
    assert list(ours.layer_types) == list(ref.layer_types)
    full, sliding = ref.rope_parameters["full_attention"], ref.rope_parameters["sliding_attention"]
    assert ours.rope_full.theta == full["rope_theta"] and ours.rope_full.factor == full.get("factor", 1.0)
    assert ours.rope_sliding.theta == sliding["rope_theta"] and ours.rope_sliding.factor == 1.0


def test_multimodal_defaults_and_metadata():
    config = parse_config(HUB_4B_LEGACY)
    assert config.is_multimodal and config.eos_token_ids == (1, 106)
    assert config.text.weight_dtype == "bfloat16"
    assert config.text.embed_scale == 50.5  # sqrt(2560) in bf16, as transformers multiplies it


def test_transformers5_rope_parameters_win_over_legacy_keys():
    raw = dict(
        HUB_27B_TEXT,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 123.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 45.0},
        },
    )
    raw.pop("rope_scaling")
    text = parse_config(raw).text
    assert (text.rope_full.theta, text.rope_full.factor, text.rope_sliding.theta) == (123.0, 1.0, 45.0)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model_type": "llama", "hidden_size": 8}, "model_type 'llama' is not Gemma 3"),
        ({"hidden_size": 8}, "model_type None is not Gemma 3"),
        ({k: v for k, v in HUB_27B_TEXT.items() if k != "hidden_size"}, "missing required key(s) hidden_size"),
        (dict(HUB_27B_TEXT, num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
        (dict(HUB_27B_TEXT, layer_types=["full_attention"]), "layer_types must list 62 entries"),
        (dict(HUB_27B_TEXT, rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type 'yarn' is not supported"),
    ],
)
def test_bad_configs_are_one_clear_error(raw, message):
    with pytest.raises(Gemma3Error) as info:
        parse_config(raw)
    assert message in str(info.value) and "\n" not in str(info.value)


BAD_LAYER_PATTERNS = {
    "pattern_zero": ({"sliding_window_pattern": 0}, "sliding_window_pattern must be a positive integer"),
    "pattern_negative": ({"sliding_window_pattern": -6}, "sliding_window_pattern must be a positive integer"),
    "pattern_not_a_number": ({"sliding_window_pattern": "6"}, "sliding_window_pattern must be a positive integer"),
    "private_pattern_zero": ({"_sliding_window_pattern": 0}, "_sliding_window_pattern must be a positive integer"),
    "layer_types_too_short": ({"layer_types": ["sliding_attention"] * 61}, "layer_types must list 62 entries"),
    "layer_types_unknown": (
        {"layer_types": ["sliding_attention"] * 61 + ["chunked_attention"]},
        "unknown entry 'chunked_attention'",
    ),
    "layer_types_not_a_list": ({"layer_types": "sliding_attention"}, "layer_types must list 62 entries"),
}


def write_config(folder, raw: dict):
    import json

    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def bad_pattern_config(case: str) -> dict:
    raw = {k: v for k, v in HUB_27B_TEXT.items() if k != "sliding_window_pattern"}
    return {**raw, **BAD_LAYER_PATTERNS[case][0]}


@pytest.mark.parametrize("case", sorted(BAD_LAYER_PATTERNS))
def test_bad_layer_pattern_is_one_clear_error(tmp_path, case):
    from mlx_gemma3.model.config import load_config

    folder = write_config(tmp_path / "model", bad_pattern_config(case))
    with pytest.raises(Gemma3Error) as info:
        load_config(folder)
    message = str(info.value)
    assert BAD_LAYER_PATTERNS[case][1] in message and str(folder / "config.json") in message
    assert "fix it or remove the key" in message and "\n" not in message


@pytest.mark.parametrize("case", ["pattern_zero", "layer_types_unknown"])
def test_bad_layer_pattern_through_the_generate_cli(tmp_path, case):
    from conftest import run_cli

    folder = write_config(tmp_path / "model", bad_pattern_config(case))
    result = run_cli("mlx_gemma3.generate", "--model", str(folder), "--prompt", "hi")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and BAD_LAYER_PATTERNS[case][1] in lines[0]
