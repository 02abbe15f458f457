"""mlx_gemma3.model.attention.attention (the CPU's composed path and MLX's fused kernel) against torch's attention."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma3.model.attention import attention


def torch_attention(q, k, v, scale, mask):
    repeat = q.shape[1] // k.shape[1]
    k, v = (torch.from_numpy(t).repeat_interleave(repeat, dim=1) for t in (k, v))
    m = None if mask is None else torch.from_numpy(mask)
    return torch.nn.functional.scaled_dot_product_attention(torch.from_numpy(q), k, v, attn_mask=m, scale=scale).numpy()


def inputs(L, N, heads=4, kv_heads=2, D=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, h, n, D)).astype(np.float32) for h, n in ((heads, L), (kv_heads, N), (kv_heads, N))]


def sliding_mask(L, N, window):
    queries = np.arange(N - L, N)[:, None]
    keys = np.arange(N)[None]
    return (keys <= queries) & (keys > queries - window)


@pytest.mark.parametrize("L, N, mask_shape", [(7, 7, "2d"), (5, 12, "2d"), (6, 9, "4d"), (1, 9, "2d"), (8, 8, None)])
def test_attention_matches_torch(L, N, mask_shape):
    q, k, v = inputs(L, N)
    mask = None if mask_shape is None else sliding_mask(L, N, window=4)
    if mask_shape == "4d":  # [B, 1, L, N], as image blocks make it
        mask = mask[None, None].copy()
        mask[..., 1, :3] = True  # a query that sees keys after it, as inside an image
    expected = torch_attention(q, k, v, 0.3, mask)
    with mx.stream(mx.cpu):
        ours = attention(mx.array(q), mx.array(k), mx.array(v), 0.3, None if mask is None else mx.array(mask))
    np.testing.assert_allclose(np.array(ours), expected, atol=1e-5, rtol=1e-5)
