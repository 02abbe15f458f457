"""Scaled dot-product attention: MLX's fused kernel, or a composed path that is faster on the CPU.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import mlx.core as mx

from .device import on_cpu


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """softmax(q·kᵀ·scale, masked)·v for q [B, H, L, D] and k, v [B, KV heads, N, D]; a boolean `mask`
    broadcasts to [B, 1, L, N]. MLX's fused kernel, except for several queries on the CPU: there the
    scores are computed as k·qᵀ, which the CPU BLAS runs untransposed (1.5× the fused fallback)."""
    if q.shape[2] == 1 or not on_cpu():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    B, H, L, D = q.shape
    kv_heads = k.shape[1]
    queries = (q * scale).reshape(B, kv_heads, H // kv_heads * L, D)
    scores = (k @ mx.contiguous(queries.swapaxes(-1, -2))).swapaxes(-1, -2)
    if mask is not None:
        scores = scores.reshape(B, kv_heads, H // kv_heads, L, -1)
        mask = mask[:, :, None] if mask.ndim == 4 else mask
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype)).reshape(B, kv_heads, H // kv_heads * L, -1)
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ v).reshape(B, H, L, D)
