"""Caches: chunked prefill and decode against transformers' single pass; bounded sliding caches; trim."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_gemma3
from conftest import TINY_TEXT, convert, random_ids, reference_logits
from mlx_gemma3.cache import SlidingKVCache

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
