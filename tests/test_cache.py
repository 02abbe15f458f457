"""Caches: chunked prefill and decode against transformers' single pass; bounded sliding caches; trim."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_gemma3
from conftest import TINY_TEXT, convert, random_ids, reference_logits
from mlx_gemma3.model.cache import SlidingKVCache

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
        def update(keys, values, original=layer_cache.update_and_fetch, kind=layer_cache.kind):
            out = original(keys, values)
            seen.append((kind, keys.shape[2], out[0].shape[2]))
            return out
        layer_cache.update_and_fetch = update
    return seen


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
        assert all(c.held() == held + piece.shape[1] for c, held in zip(cache, before) if c.kind == "full")
    sliding = [(chunk, fetched) for kind, chunk, fetched in seen if kind == "sliding"]
    assert len(sliding) > 0 and all(fetched <= WINDOW + chunk + cache[0].rewind for chunk, fetched in sliding)
    assert all(c.held() == 2000 for c in cache if c.kind == "full")


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
    sliding = [c for c in cache if c.kind == "sliding"]
    assert all(c.trimmable() == c.rewind for c in sliding)
    assert all(c.trim(100) == c.rewind for c in sliding)


@pytest.fixture(scope="module")
def wide_head(tmp_path_factory):
    """A tiny model with head_dim 64 so the KV cache can be quantized in groups of 32 and 64."""
    from conftest import tiny_text_model

    folder = tmp_path_factory.mktemp("wide")
    reference = tiny_text_model(seed=3, head_dim=64, query_pre_attn_scalar=64)
    reference.save_pretrained(folder / "hf")
    model, _ = mlx_gemma3.load(convert(folder / "hf", folder / "mlx"))
    return model, reference


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
    assert all(c.held() <= 24 - 1 + c.rewind for c in cache)
    with pytest.raises(mlx_gemma3.Gemma3Error, match="max_kv_size"):
        model.make_cache(max_kv_size=0)
