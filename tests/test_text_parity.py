"""Text tower parity: our logits against transformers' on tiny random Gemma 3 models (float32, 1e-4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (
    TINY_TEXT,
    convert,
    edit_config,
    our_logits,
    random_ids,
    reference_logits,
    tiny_multimodal_model,
    tiny_text_model,
)

TOL = 1e-4
WINDOW = TINY_TEXT["sliding_window"]
LINEAR_X8 = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}

CASES = {
    "prompt_3x_window": dict(),
    "linear_rope_x8_full_layers": dict(rope_parameters=LINEAR_X8),
    "27b_style_query_pre_attn_scalar": dict(query_pre_attn_scalar=24, num_attention_heads=4, num_key_value_heads=2),
    "gqa_several_kv_heads": dict(num_attention_heads=8, num_key_value_heads=4),
    "multi_query": dict(num_attention_heads=4, num_key_value_heads=1),
    "explicit_layer_types": dict(
        layer_types=[
            "full_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "sliding_attention",
        ]
    ),
    "final_logit_softcapping": dict(final_logit_softcapping=3.0),
}


def assert_close(ours: np.ndarray, ref: np.ndarray, tol: float = TOL) -> None:
    assert ours.shape == ref.shape
    delta = np.abs(ours - ref).max()
    assert delta <= tol, f"max |Δ| = {delta:.3g} > {tol} (logits up to {np.abs(ref).max():.3g})"


@pytest.mark.parametrize("case", sorted(CASES))
def test_text_logits_match_transformers(tmp_path, case):
    model = tiny_text_model(**CASES[case])
    model.save_pretrained(tmp_path / "hf")
    ids = random_ids(3 * WINDOW + 5, batch=2)
    ours = our_logits(convert(tmp_path / "hf", tmp_path / "mlx"), ids)
    assert_close(ours, reference_logits(model, ids))


def test_rope_scaling_reaches_full_layers_only(tmp_path):
    """×8 on full layers changes the logits; our model follows transformers both ways."""
    ids = random_ids(3 * WINDOW)
    plain, scaled = tiny_text_model(), tiny_text_model(rope_parameters=LINEAR_X8)
    ref_plain, ref_scaled = reference_logits(plain, ids), reference_logits(scaled, ids)
    assert np.abs(ref_plain - ref_scaled).max() > 1e-2
    scaled.save_pretrained(tmp_path / "hf")
    assert_close(our_logits(convert(tmp_path / "hf", tmp_path / "mlx"), ids), ref_scaled)


def to_legacy_keys(config: dict) -> None:
    """Rewrite a transformers-5 config.json in the key generation of the Hub's Gemma 3 checkpoints."""
    rope = config.pop("rope_parameters")
    config.pop("layer_types")
    config.pop("_sliding_window_pattern", None)
    config["rope_theta"] = rope["full_attention"]["rope_theta"]
    config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    if rope["full_attention"]["rope_type"] == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": rope["full_attention"]["factor"]}
    config["sliding_window_pattern"] = 3


def test_legacy_key_config(tmp_path):
    """Legacy rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern, read by both sides."""
    from transformers import Gemma3ForCausalLM

    source = tiny_text_model(
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 50_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 2_000.0},
        }
    )
    source.save_pretrained(tmp_path / "hf")
    edit_config(tmp_path / "hf", to_legacy_keys)
    reference = Gemma3ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert reference.config.layer_types[2] == "full_attention"
    assert reference.config.rope_parameters["full_attention"]["factor"] == 8.0
    ids = random_ids(3 * WINDOW)
    assert_close(our_logits(convert(tmp_path / "hf", tmp_path / "mlx"), ids), reference_logits(reference, ids))


def test_written_config_carries_both_generations(tmp_path):
    tiny_text_model(rope_parameters=LINEAR_X8).save_pretrained(tmp_path / "hf")
    config = json.loads((convert(tmp_path / "hf", tmp_path / "mlx") / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert config["rope_parameters"]["full_attention"]["factor"] == 8.0
    assert config["rope_local_base_freq"] == 10_000.0 and config["sliding_window_pattern"] == 6


def test_sharded_checkpoint(tmp_path):
    model = tiny_text_model()
    model.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ids = random_ids(40)
    assert_close(our_logits(convert(tmp_path / "hf", tmp_path / "mlx"), ids), reference_logits(model, ids))


def test_multimodal_checkpoint_text_tower(tmp_path):
    """Gemma3ForConditionalGeneration's key layout (language_model.model.*), text-only prompt."""
    model = tiny_multimodal_model(rope_parameters=LINEAR_X8)
    model.save_pretrained(tmp_path / "hf")
    ids = random_ids(3 * WINDOW)
    ours = our_logits(convert(tmp_path / "hf", tmp_path / "mlx"), ids)
    assert_close(ours, reference_logits(model, ids))


@pytest.mark.parametrize("layout", ["model.language_model.", "language_model.model."])
def test_key_layout_variants(tmp_path, layout):
    """Both multimodal text-key prefixes (Hub, transformers-5 internal) convert to the same model."""
    from safetensors.torch import load_file, save_file

    model = tiny_multimodal_model()
    model.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    save_file({k.replace("language_model.model.", layout): v for k, v in tensors.items()}, path)
    ids = random_ids(20)
    assert_close(our_logits(convert(tmp_path / "hf", tmp_path / "mlx"), ids), reference_logits(model, ids))


def test_bfloat16_weights(tmp_path):
    """bf16 weights (our float32 compute) against transformers' bf16 model, and both against float32."""
    from transformers import Gemma3ForCausalLM

    model = tiny_text_model()
    model.save_pretrained(tmp_path / "hf")
    ids = random_ids(3 * WINDOW)
    ours = our_logits(convert(tmp_path / "hf", tmp_path / "mlx", "--dtype", "bfloat16"), ids)
    reference_bf16 = Gemma3ForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    ref_bf16 = reference_logits(reference_bf16, ids)
    ref_f32 = reference_logits(model, ids)
    scale = np.abs(ref_f32).max()
    bf16_noise = np.abs(ref_bf16 - ref_f32).max()
    assert np.abs(ours - ref_bf16).max() <= 0.05 * scale
    # Rounding weights to bf16 but computing in float32 is no further from float32 than transformers' bf16 run.
    assert np.abs(ours - ref_f32).max() <= bf16_noise
