"""Caches: chunked prefill and decode against transformers' single pass; bounded sliding caches; trim."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_TEXT, convert, random_ids, reference_logits

import mlx_gemma3
from mlx_gemma3.model.cache import SINK_TOKENS, BoundedKVCache, KVCache, SlidingKVCache

WINDOW = TINY_TEXT["sliding_window"]


def run_chunks(model, ids: np.ndarray, chunk: int, cache) -> np.ndarray:
    out = []
    for start in range(0, ids.shape[1], chunk):
        out.append(np.array(model(mx.array(ids[:, start : start + chunk]), cache=cache)))
        for layer_cache in cache:
            if isinstance(layer_cache, SlidingKVCache):
                assert layer_cache.held() <= WINDOW - 1 + layer_cache.rewind
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("chunk", [1, 7, WINDOW - 1, WINDOW, WINDOW + 1, 3 * WINDOW + 5])
def test_chunked_prefill_matches_transformers(hf_text, tmp_path, chunk):
    hf_dir, reference = hf_text
    model, _ = mlx_gemma3.load(convert(hf_dir, tmp_path / "mlx"))
    ids = random_ids(3 * WINDOW + 5)
    ours = run_chunks(model, ids, chunk, model.make_cache())
    delta = np.abs(ours - reference_logits(reference, ids)).max()
    assert delta <= 1e-4, delta


def test_trim_after_the_window_slid(hf_text, tmp_path):
    hf_dir, reference = hf_text
    model, _ = mlx_gemma3.load(convert(hf_dir, tmp_path / "mlx"))
    ids = random_ids(4 * WINDOW)
    cache = model.make_cache()
    run_chunks(model, ids[:, :-5], 9, cache)
    assert all(c.trim(5) == 5 for c in cache)
    again = run_chunks(model, ids[:, -10:], 1, cache)
    delta = np.abs(again - reference_logits(reference, ids)[:, -10:]).max()
    assert delta <= 1e-4, delta


def record_fetches(cache) -> list[tuple[str, int]]:
    """Wrap every layer cache so each call's fetched key count is recorded as (kind, keys)."""
    seen = []
    for layer_cache in cache:

        def update(keys, values, original=layer_cache.update_and_fetch, kind=type(layer_cache).__name__):  # noqa: B008
            out = original(keys, values)
            seen.append((kind, keys.shape[2], out[0].shape[2]))
            return out

        layer_cache.update_and_fetch = update
    return seen


@pytest.mark.slow
def test_long_run_keeps_sliding_caches_bounded(hf_text, tmp_path):
    hf_dir, _ = hf_text
    model, _ = mlx_gemma3.load(convert(hf_dir, tmp_path / "mlx"))
    cache = model.make_cache()
    seen = record_fetches(cache)
    ids, start, chunks = random_ids(2000), 0, [1, 7, 1, 1, 33, 1, WINDOW + 1, 2, 1]
    while start < ids.shape[1]:
        piece = ids[:, start : start + chunks[len(seen) % len(chunks)]]
        before = [c.held() for c in cache]
        mx.eval(model(mx.array(piece), cache=cache))
        start += piece.shape[1]
        assert all(c.held() == held + piece.shape[1] for c, held in zip(cache, before) if type(c) is KVCache)
    sliding = [(chunk, fetched) for kind, chunk, fetched in seen if kind == "SlidingKVCache"]
    assert len(sliding) > 0 and all(fetched <= WINDOW + chunk + cache[0].rewind for chunk, fetched in sliding)
    assert all(c.held() == 2000 for c in cache if type(c) is KVCache)


def test_trim_after_the_ring_wrapped_then_refeed(hf_text, tmp_path):
    hf_dir, _ = hf_text
    model, _ = mlx_gemma3.load(convert(hf_dir, tmp_path / "mlx"))
    ids = random_ids(5 * WINDOW + 3)
    cache = model.make_cache()
    model(mx.array(ids[:, :40]), cache=cache)
    steps = [np.array(model(mx.array(ids[:, i : i + 1]), cache=cache)) for i in range(40, ids.shape[1])]
    k = cache[0].rewind
    assert all(c.trim(k) == k for c in cache)
    again = [np.array(model(mx.array(ids[:, i : i + 1]), cache=cache)) for i in range(ids.shape[1] - k, ids.shape[1])]
    assert np.abs(np.concatenate(again, 1) - np.concatenate(steps[-k:], 1)).max() <= 1e-5


def test_trim_refuses_more_than_the_rewind_after_wrap(hf_text, tmp_path):
    hf_dir, _ = hf_text
    model, _ = mlx_gemma3.load(convert(hf_dir, tmp_path / "mlx"))
    cache = model.make_cache()
    model(mx.array(random_ids(3 * WINDOW)), cache=cache)
    sliding = [c for c in cache if type(c) is SlidingKVCache]
    assert all(c.trimmable() == c.rewind for c in sliding)
    assert all(c.trim(100) == c.rewind for c in sliding)


@pytest.fixture(scope="module")
def wide_head(converted_tiny):
    """A tiny model with head_dim 64 so the KV cache can be quantized in groups of 32 and 64."""
    from conftest import WIDE_HEAD

    tiny = converted_tiny(WIDE_HEAD, seed=3)
    return mlx_gemma3.load(tiny.folder)[0], tiny.reference


# Stated tolerance: quantized-cache logits stay within this fraction of the logits' spread (max |Δ| / std).
KV_TOLERANCE = {8: 0.03, 4: 0.4}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 64])
def test_quantized_caches_track_the_float_cache(wide_head, bits, group):
    model, reference = wide_head
    ids = random_ids(3 * WINDOW + 5)
    expected = reference_logits(reference, ids)
    ours = run_chunks(model, ids, 7, model.make_cache(kv_bits=bits, kv_group_size=group))
    assert np.abs(run_chunks(model, ids, 7, model.make_cache()) - expected).max() <= 1e-4
    relative = np.abs(ours - expected).max() / expected.std()
    print(f"kv {bits}-bit group {group}: max |Δ| / std = {relative:.4f}")
    assert 0 < relative <= KV_TOLERANCE[bits], relative


def test_quantized_cache_rejects_a_group_that_does_not_divide_head_dim(hf_text, tmp_path):
    hf_dir, _ = hf_text
    model, _ = mlx_gemma3.load(convert(hf_dir, tmp_path / "mlx"))
    with pytest.raises(mlx_gemma3.Gemma3Error, match="not divisible by the KV group size"):
        model(mx.array(random_ids(4)), cache=model.make_cache(kv_bits=4, kv_group_size=32))
    with pytest.raises(mlx_gemma3.Gemma3Error, match="bits must be one of"):
        model.make_cache(kv_bits=3)


@pytest.mark.parametrize("bits", [None, 4])
def test_prompt_cache_round_trip_continues_identically(wide_head, tmp_path, bits):
    from mlx_gemma3.model.cache import load_prompt_cache, save_prompt_cache

    model, _ = wide_head
    ids = random_ids(3 * WINDOW + 5)
    cache = model.make_cache(kv_bits=bits)
    model(mx.array(ids[:, :-4]), cache=cache)
    path = tmp_path / "prompt.safetensors"
    save_prompt_cache(path, cache, ids[0, :-4].tolist(), extra={"note": "x"})
    restored, tokens, extra = load_prompt_cache(path)
    assert tokens == ids[0, :-4].tolist() and extra == {"note": "x"}
    assert [type(c) for c in restored] == [type(c) for c in cache]
    expected = run_chunks(model, ids[:, -4:], 1, cache)
    assert np.array_equal(run_chunks(model, ids[:, -4:], 1, restored), expected)


def test_prompt_cache_rejects_other_files(tmp_path):
    from mlx_gemma3.model.cache import load_prompt_cache

    mx.save_safetensors(str(tmp_path / "w.safetensors"), {"a": mx.zeros((2,))})
    with pytest.raises(mlx_gemma3.Gemma3Error, match="not a prompt cache"):
        load_prompt_cache(tmp_path / "w.safetensors")
    with pytest.raises(mlx_gemma3.Gemma3Error, match="cannot read prompt cache"):
        load_prompt_cache(tmp_path / "missing.safetensors")


def test_max_kv_size_bounds_full_layers(hf_text, tmp_path):
    hf_dir, _ = hf_text
    model, _ = mlx_gemma3.load(convert(hf_dir, tmp_path / "mlx"))
    cache = model.make_cache(max_kv_size=24)
    model(mx.array(random_ids(100)), cache=cache)
    for layer, c in zip(model.layers, cache):
        if layer.is_sliding:  # the window (16) is already below the bound
            assert type(c) is SlidingKVCache and c.held() <= WINDOW - 1 + c.rewind
        else:
            assert type(c) is BoundedKVCache and c.held() <= SINK_TOKENS + (24 - SINK_TOKENS) - 1 + c.recent.rewind
    for bad in (0, SINK_TOKENS):
        with pytest.raises(mlx_gemma3.Gemma3Error, match="max_kv_size"):
            model.make_cache(max_kv_size=bad)


def mlx_lm_step_logits(folder, ids: list[int], max_kv_size: int) -> np.ndarray:
    """mlx-lm's Gemma 3 fed one token at a time, its full layers bounded by RotatingKVCache(max_kv_size, keep=4)."""
    from mlx_lm.models.cache import KVCache as LmKVCache
    from mlx_lm.models.cache import RotatingKVCache
    from mlx_lm.utils import load_model

    lm, _ = load_model(folder)
    cache = [RotatingKVCache(max_kv_size, keep=4) if type(c) is LmKVCache else c for c in lm.make_cache()]
    steps = [lm(mx.array([[token]]), cache=cache)[0, -1] for token in ids]
    return np.stack([np.array(step) for step in steps])


@pytest.mark.parametrize("chunk", [1, 7, None])
@pytest.mark.slow
def test_max_kv_size_keeps_attention_sinks_like_mlx_lm(hf_text, tmp_path, chunk):
    """Past the bound, full layers see the first 4 tokens and the latest max_kv_size − 4, as mlx-lm's rotating
    cache does (mlx-lm is the reference: transformers has no bounded cache)."""
    hf_dir, _ = hf_text
    folder = convert(hf_dir, tmp_path / "mlx")
    model, _ = mlx_gemma3.load(folder)
    ids = random_ids(70, seed=3)[0].tolist()
    expected = mlx_lm_step_logits(folder, ids, 24)
    cache = model.make_cache(max_kv_size=24)
    step = chunk or len(ids) - 10
    ours = [model(mx.array([ids[i : i + step]]), cache=cache)[0] for i in range(0, len(ids), step)]
    assert np.abs(np.concatenate([np.array(o) for o in ours]) - expected).max() <= 1e-4
    without_sinks = model.make_cache()
    unbounded = np.array(model(mx.array([ids]), cache=without_sinks)[0])
    assert np.abs(unbounded[30:] - expected[30:]).max() > 1e-2  # the bound is in effect


def test_a_bounded_cache_saves_copies_and_trims(hf_text, tmp_path):
    from mlx_gemma3.model.cache import load_prompt_cache, save_prompt_cache

    hf_dir, _ = hf_text
    folder = convert(hf_dir, tmp_path / "mlx")
    model, _ = mlx_gemma3.load(folder)
    ids = random_ids(45, seed=4)[0].tolist()
    expected = mlx_lm_step_logits(folder, ids, 24)
    cache = model.make_cache(max_kv_size=24)
    mx.eval(model(mx.array([ids[:40]]), cache=cache))
    copy = [c.copy() for c in cache]
    save_prompt_cache(tmp_path / "bounded.safetensors", cache, ids[:40])
    loaded, _, _ = load_prompt_cache(tmp_path / "bounded.safetensors")
    assert all(c.trim(3) == 3 for c in cache)
    mx.eval(model(mx.array([ids[37:42]]), cache=cache))  # refeed the trimmed tokens, then two more
    for c in (copy, loaded):
        assert np.abs(np.array(model(mx.array([ids[40:45]]), cache=c)[0]) - expected[40:45]).max() <= 1e-4
    assert np.abs(np.array(model(mx.array([ids[42:45]]), cache=cache)[0]) - expected[42:45]).max() <= 1e-4


def prefilled(model, ids: np.ndarray, bits: int | None) -> list:
    cache = model.make_cache(kv_bits=bits)
    mx.eval(model(mx.array(ids), cache=cache))
    return cache


def next_logits(model, cache, ids: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(ids), cache=cache)[:, -1])


# Every cache kind: the model's caches hold full and sliding layers; 3·W + 5 tokens make the sliding ring wrap.
KINDS = [(None, 10), (None, 3 * WINDOW + 5), (8, 3 * WINDOW + 5), (4, 3 * WINDOW + 5)]


@pytest.mark.parametrize("bits, length", KINDS)
def test_a_cache_rebuilt_from_its_state_continues_like_the_original(wide_head, bits, length):
    from mlx_gemma3.model.cache import cache_class

    model, reference = wide_head
    ids = random_ids(length + 1)
    expected = next_logits(model, prefilled(model, ids[:, :length], bits), ids[:, length:])
    cache = prefilled(model, ids[:, :length], bits)
    rebuilt = [cache_class(type(c).__name__).from_state(c.state, c.meta_state) for c in cache]
    assert [type(c) for c in rebuilt] == [type(c) for c in cache]
    assert np.abs(next_logits(model, rebuilt, ids[:, length:]) - expected).max() <= 1e-4
    if bits is None:
        assert np.abs(expected - reference_logits(reference, ids)[:, -1]).max() <= 1e-4


@pytest.mark.parametrize("bits, length", KINDS)
def test_a_copy_keeps_its_tokens_while_the_original_is_extended_and_trimmed(wide_head, bits, length):
    model, reference = wide_head
    ids = random_ids(length + 24)
    cache = prefilled(model, ids[:, :length], bits)
    snapshot = [c.copy() for c in cache]
    for i in range(length, length + 24):  # one at a time, written in place: the ring overwrites the copy's slots
        mx.eval(model(mx.array(ids[:, i : i + 1]), cache=cache))
    assert all(c.trim(3) == 3 for c in cache)
    held = length + 21
    ours = next_logits(model, snapshot, ids[:, length : length + 1])
    expected = next_logits(model, prefilled(model, ids[:, :length], bits), ids[:, length : length + 1])
    assert np.abs(ours - expected).max() <= 1e-4
    original = next_logits(model, cache, ids[:, held : held + 1])  # the copy's own write did not reach it
    if bits is None:
        references = reference_logits(reference, ids)
        assert np.abs(ours - references[:, length]).max() <= 1e-4
        assert np.abs(original - references[:, held]).max() <= 1e-4
    else:
        again = next_logits(model, prefilled(model, ids[:, :held], bits), ids[:, held : held + 1])
        assert np.abs(original - again).max() <= 1e-4


def test_cache_bytes_and_trimmability_follow_the_protocol(wide_head):
    model, _ = wide_head
    cache = prefilled(model, random_ids(3 * WINDOW), None)
    assert all(c.nbytes == sum(a.nbytes for a in c.state) for c in cache if type(c) is SlidingKVCache)
    assert all(c.nbytes >= sum(a.nbytes for a in c.state) > 0 for c in cache)
    sliding = next(c for c in cache if type(c) is SlidingKVCache)
    assert sliding.is_trimmable(sliding.rewind) and not sliding.is_trimmable(sliding.rewind + 1)


def test_prompt_cache_files_of_the_previous_format_are_named(tmp_path):
    from mlx_gemma3.model.cache import load_prompt_cache

    path = tmp_path / "old.safetensors"
    mx.save_safetensors(str(path), {"token_ids": mx.zeros((1,))}, metadata={"format": "mlx_gemma3.prompt_cache/1"})
    with pytest.raises(mlx_gemma3.Gemma3Error, match="older mlx_gemma3"):
        load_prompt_cache(path)


def test_a_bounded_cache_is_refused_by_batching(hf_text, tmp_path):
    from mlx_gemma3.model.cache import batch_cache, merge_caches

    hf_dir, _ = hf_text
    model, _ = mlx_gemma3.load(convert(hf_dir, tmp_path / "mlx"))
    for build in (
        lambda: batch_cache(model.make_cache(max_kv_size=24), [0, 2]),
        lambda: merge_caches([model.make_cache(max_kv_size=24), model.make_cache(max_kv_size=24)]),
    ):
        with pytest.raises(mlx_gemma3.Gemma3Error, match="bounded by max_kv_size cannot be batched"):
            build()
