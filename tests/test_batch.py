"""Batch rows: prompts of different lengths run together, each row equal to its own single run; rows removed and added."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_TEXT, WIDE_HEAD, random_ids

import mlx_gemma3
from mlx_gemma3.model.cache import (
    batch_cache,
    extract_cache,
    filter_cache,
    left_padded,
    load_prompt_cache,
    merge_caches,
    save_prompt_cache,
)

WINDOW = TINY_TEXT["sliding_window"]
LENGTHS = [5, 12, WINDOW + 9, 3]  # one prompt longer than the sliding window
STEPS = 30


@pytest.fixture(scope="module")
def models(converted_tiny):
    """The tiny model (head_dim 16) for float caches, and one with head_dim 64 for 8-bit KV (groups of 64)."""
    return {
        "tiny": mlx_gemma3.load(converted_tiny(seed=4).folder)[0],
        "wide": mlx_gemma3.load(converted_tiny(WIDE_HEAD, seed=3).folder)[0],
    }


def prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    return [random_ids(n, seed=seed + i)[0].tolist() for i, n in enumerate(lengths)]


def decode(model, cache, logits: mx.array, steps: int) -> tuple[np.ndarray, np.ndarray, mx.array]:
    """Greedy steps for every row: (tokens [B, steps], the logits that chose them [B, steps, V], the next logits)."""
    tokens, seen = [], []
    for _ in range(steps):
        token = mx.argmax(logits, axis=-1)
        tokens.append(np.array(token))
        seen.append(np.array(logits))
        logits = model(token[:, None], cache=cache)[:, -1]
    return np.stack(tokens, 1), np.stack(seen, 1), logits


def alone(model, prompt: list[int], steps: int, bits: int | None) -> tuple[np.ndarray, np.ndarray]:
    cache = model.make_cache(kv_bits=bits)
    tokens, seen, _ = decode(model, cache, model(mx.array([prompt]), cache=cache)[:, -1], steps)
    return tokens[0], seen[0]


def prefill(model, cache, ids: mx.array, chunk: int) -> mx.array:
    for start in range(0, ids.shape[1], chunk):
        logits = model(ids[:, start : start + chunk], cache=cache)[:, -1]
    return logits


def tolerance(model, bits: int | None) -> float:
    """How far a batch row's logits may stray from its single run. Float caches: 1e-4 (rows sum their keys in
    another order once the ring wraps). Quantized caches: such a difference may round a key or value to the
    neighbouring step, so the bound is 5 % of the quantized cache's own error (its logits against a float cache's,
    on the first prompt)."""
    if bits is None:
        return 1e-4
    prompt = prompts(LENGTHS)[0]
    return 0.05 * np.abs(alone(model, prompt, STEPS, None)[1] - alone(model, prompt, STEPS, bits)[1]).max()


def assert_rows_match(tokens, seen, singles, steps: slice = slice(None), bound: float = 1e-4) -> None:
    for row, (single_tokens, single_logits) in enumerate(singles):
        assert tokens[row].tolist() == single_tokens[steps].tolist(), row
        delta = np.abs(seen[row] - single_logits[steps]).max()
        assert delta <= bound, (row, delta, bound)


@pytest.mark.parametrize(
    "name, bits, chunk", [("tiny", None, 64), ("tiny", None, 7), ("wide", None, 64), ("wide", 8, 7)]
)
def test_a_batch_of_prompts_decodes_each_row_as_alone(models, name, bits, chunk):
    model = models[name]
    batch = prompts(LENGTHS)
    ids, padding = left_padded(batch)
    cache = batch_cache(model.make_cache(kv_bits=bits), padding)
    tokens, seen, _ = decode(model, cache, prefill(model, cache, ids, chunk), STEPS)
    assert_rows_match(
        tokens, seen, [alone(model, prompt, STEPS, bits) for prompt in batch], bound=tolerance(model, bits)
    )


@pytest.mark.parametrize("bits", [None, 8])
def test_rows_leave_and_join_a_running_batch(models, bits):
    model = models["wide"]
    first, late = prompts(LENGTHS), prompts([2 * WINDOW + 8], seed=9)[0]  # the late row has slid past its window
    singles = [alone(model, prompt, 14, bits) for prompt in first]
    late_single = alone(model, late, 7, bits)
    bound = tolerance(model, bits)
    ids, padding = left_padded(first)
    cache = batch_cache(model.make_cache(kv_bits=bits), padding)
    tokens, seen, logits = decode(model, cache, model(ids, cache=cache)[:, -1], 5)
    assert_rows_match(tokens, seen, singles, slice(0, 5), bound=bound)

    leaving = extract_cache(cache, 1)
    tokens, seen, _ = decode(model, leaving, logits[1:2], 3)
    assert_rows_match(tokens, seen, singles[1:2], slice(5, 8), bound=bound)

    cache, logits = filter_cache(cache, [0, 2, 3]), logits[mx.array([0, 2, 3])]
    tokens, seen, logits = decode(model, cache, logits, 2)
    assert_rows_match(tokens, seen, [singles[i] for i in (0, 2, 3)], slice(5, 7), bound=bound)

    late_cache = model.make_cache(kv_bits=bits)
    late_logits = model(mx.array([late]), cache=late_cache)[:, -1]
    cache = merge_caches([cache, late_cache])
    tokens, seen, _ = decode(model, cache, mx.concatenate([logits, late_logits]), 7)
    assert_rows_match(tokens[:3], seen[:3], [singles[i] for i in (0, 2, 3)], slice(7, 14), bound=bound)
    assert_rows_match(tokens[3:], seen[3:], [late_single], slice(0, 7), bound=bound)


def test_a_saved_batch_continues_identically(models, tmp_path):
    model = models["tiny"]
    batch = prompts(LENGTHS)
    ids, padding = left_padded(batch)
    cache = batch_cache(model.make_cache(), padding)
    logits = model(ids, cache=cache)[:, -1]
    save_prompt_cache(tmp_path / "batch.safetensors", cache, [])
    restored, _, _ = load_prompt_cache(tmp_path / "batch.safetensors")
    copies = [layer.copy() for layer in cache]
    expected = decode(model, cache, logits, 5)[1]
    assert np.abs(decode(model, restored, logits, 5)[1] - expected).max() <= 1e-4
    assert np.abs(decode(model, copies, logits, 5)[1] - expected).max() <= 1e-4


def test_batches_refuse_mixed_layouts_and_caches_that_hold_tokens(models):
    model = models["wide"]
    with pytest.raises(mlx_gemma3.Gemma3Error, match="one kind and layout"):
        merge_caches([model.make_cache(), model.make_cache(kv_bits=8)])
    used = model.make_cache()
    model(mx.array(random_ids(4)), cache=used)
    with pytest.raises(mlx_gemma3.Gemma3Error, match="empty caches"):
        batch_cache(used, [0])


def test_a_row_that_slid_and_was_trimmed_joins_exactly(models):
    model = models["tiny"]
    caches, logits = [], []
    for prompt, trimmed in zip(prompts([2 * WINDOW + 8] * 2, seed=20), (1, 10)):
        cache = model.make_cache()
        model(mx.array([prompt]), cache=cache)
        assert all(layer.trim(trimmed) == trimmed for layer in cache)
        logits.append(model(mx.array([[prompt[-trimmed]]]), cache=cache)[:, -1])
        caches.append(cache)
    singles = [
        decode(model, [layer.copy() for layer in cache], row_logits, 6)[:2] for cache, row_logits in zip(caches, logits)
    ]
    singles = [(tokens[0], seen[0]) for tokens, seen in singles]
    batch = merge_caches(caches)
    assert [layer.trimmable() for layer in batch] == [min(a.trimmable(), b.trimmable()) for a, b in zip(*caches)]
    tokens, seen, _ = decode(model, batch, mx.concatenate(logits), 6)
    assert_rows_match(tokens, seen, singles)
