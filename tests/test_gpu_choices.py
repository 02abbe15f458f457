"""The GPU's paths, run on this CPU (the `gpu_choices` fixture): bfloat16 compute, row-major weights and MLX's fused
attention for prompt chunks, against transformers. The bound is earned from transformers itself: our bfloat16
logits stray from transformers' float32 ones on average by at most 1.25× what transformers' own bfloat16 logits do,
and at most 2× at the worst logit (measured: 0.97–1.11× on average, 0.88–1.5× at the worst); a wrong mask,
position or cache row strays by far more."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import (
    TINY_IMAGE_TOKENS,
    TINY_TEXT,
    TINY_VISION,
    bfloat16_reference,
    convert,
    random_ids,
    reference_logits,
    tiny_multimodal_model,
    tiny_text_model,
)
from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

import mlx_gemma3
from mlx_gemma3.model.cache import batch_cache, left_padded
from mlx_gemma3.model.weights import column_major_keys

WINDOW = TINY_TEXT["sliding_window"]
MAX_MARGIN, MEAN_MARGIN = 2.0, 1.25  # how much more than transformers' own bfloat16 error ours may stray
LINEAR_X8 = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}


def assert_within_bfloat16_error(ours: np.ndarray, exact: np.ndarray, half: np.ndarray) -> None:
    """`exact`: transformers in float32; `half`: transformers in bfloat16, the same inputs."""
    assert ours.shape == exact.shape
    ours_err, half_err = np.abs(ours - exact), np.abs(half - exact)
    assert 0 < half_err.max(), "the bfloat16 reference equals the float32 one: no bound to earn"
    assert ours_err.max() <= MAX_MARGIN * half_err.max(), (ours_err.max(), half_err.max())
    assert ours_err.mean() <= MEAN_MARGIN * half_err.mean(), (ours_err.mean(), half_err.mean())


def text_models(tmp_path, **overrides):
    """(transformers float32, transformers bfloat16, ours loaded with the current device choices)."""
    exact = tiny_text_model(**overrides)
    exact.save_pretrained(tmp_path / "hf")
    model, _ = mlx_gemma3.load(convert(tmp_path / "hf", tmp_path / "mlx"))
    return exact, bfloat16_reference(tmp_path / "hf", Gemma3ForCausalLM), model


def logits(model, ids, cache=None) -> np.ndarray:
    return np.array(model(mx.array(ids), cache=cache).astype(mx.float32))


def test_the_switch_takes_the_gpu_paths(gpu_choices, tmp_path):
    _, _, model = text_models(tmp_path)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    assert column_major_keys(model, mx.float32) == set()  # even float32 weights would stay row-major


@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(rope_parameters=LINEAR_X8),
        dict(query_pre_attn_scalar=24, num_attention_heads=4, num_key_value_heads=1),
    ],
    ids=["prompt_3x_window", "linear_rope_x8", "27b_style_scalar_multi_query"],
)
def test_text_logits(gpu_choices, tmp_path, case):
    exact, half, model = text_models(tmp_path, **case)
    ids = random_ids(3 * WINDOW + 5, batch=2)
    assert_within_bfloat16_error(logits(model, ids), reference_logits(exact, ids), reference_logits(half, ids))


def test_prefill_in_chunks_then_decode_through_the_caches(gpu_choices, tmp_path):
    """Chunks of 7 through a wrapping sliding ring and a growing full cache, then one token per step."""
    exact, half, model = text_models(tmp_path)
    ids = random_ids(4 * WINDOW + 3)
    prompt, steps = 2 * WINDOW + 5, ids.shape[1] - (2 * WINDOW + 5)
    cache = model.make_cache()
    ours = [logits(model, ids[:, s : min(s + 7, prompt)], cache) for s in range(0, prompt, 7)]
    ours += [logits(model, ids[:, prompt + i : prompt + i + 1], cache) for i in range(steps)]
    assert_within_bfloat16_error(np.concatenate(ours, 1), reference_logits(exact, ids), reference_logits(half, ids))


def test_batch_rows(gpu_choices, tmp_path):
    """Left-padded rows of different lengths prefilled together, then decoded together: each row as transformers
    runs it alone."""
    exact, half, model = text_models(tmp_path)
    rows = [random_ids(n, seed=i)[0].tolist() for i, n in enumerate([5, WINDOW + 9, 2 * WINDOW + 1])]
    follow = random_ids(6, seed=9)[0].tolist()
    ids, padding = left_padded(rows)
    cache = batch_cache(model.make_cache(), padding)
    ours = [logits(model, ids[:, s : s + 7], cache)[:, -1:] for s in range(0, ids.shape[1], 7)][-1:]
    ours += [logits(model, mx.array([[token]] * len(rows)), cache) for token in follow[:-1]]
    ours = np.concatenate(ours, 1)
    for row, prompt in enumerate(rows):
        full = np.array([prompt + follow[:-1]])
        exact_row = reference_logits(exact, full)[:, len(prompt) - 1 :]
        half_row = reference_logits(half, full)[:, len(prompt) - 1 :]
        assert_within_bfloat16_error(ours[row : row + 1], exact_row, half_row)


def test_image_prompt(gpu_choices, tmp_path):
    """A prompt with an image: the vision tower, the projector and the image block's two-way attention."""
    exact = tiny_multimodal_model(seed=4, image_tokens=TINY_IMAGE_TOKENS)
    exact.save_pretrained(tmp_path / "hf")
    half = bfloat16_reference(tmp_path / "hf", Gemma3ForConditionalGeneration)
    model, _ = mlx_gemma3.load(convert(tmp_path / "hf", tmp_path / "mlx"))
    image = [TINY_IMAGE_TOKENS["boi_token_index"], *[TINY_IMAGE_TOKENS["image_token_index"]] * 4]
    ids = np.array([[2, *random_ids(5)[0], *image, TINY_IMAGE_TOKENS["eoi_token_index"], *random_ids(7, seed=3)[0]]])
    size = TINY_VISION["image_size"]
    pixels = np.random.RandomState(0).uniform(-1, 1, size=(1, size, size, 3)).astype(np.float32)

    def reference(reference_model, dtype):
        with torch.no_grad():
            out = reference_model(
                input_ids=torch.tensor(ids),
                pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2).to(dtype),
                token_type_ids=torch.tensor((ids == TINY_IMAGE_TOKENS["image_token_index"]).astype(np.int64)),
            )
        return out.logits.float().numpy()

    ours = np.array(model(mx.array(ids), pixel_values=mx.array(pixels)).astype(mx.float32))
    assert_within_bfloat16_error(ours, reference(exact, torch.float32), reference(half, torch.bfloat16))
