"""Rotary position embedding as transformers computes it: exact at every position a Gemma 3 reaches (128K).

transformers forms each angle as one float32 product, position × inverse frequency, takes cos and sin in float32
and casts them to the compute dtype, then rotates q and k in that dtype: `x·cos + rotate_half(x)·sin`. Here the
same: the inverse frequencies are transformers' own float32 values, the product is the same single rounding, and
MLX's cos and sin are the accurate ones on both devices (`mx.fast.rope` uses the fast approximations on Metal,
whose argument reduction drifts at large angles, and a base formula that rounds differently: at position 131,071
its cos/sin stray from transformers' by up to 7e-3).

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .config import RopeConfig


class Rotation(NamedTuple):
    """cos and sin of every angle of the positions of one forward call, full width [.., L, head_dim] in the compute
    dtype; `sin` has its first half negated, so that rotating is two products and a sum."""

    cos: mx.array
    sin: mx.array


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> np.ndarray:
    """transformers' float32 inverse frequencies: 1 / base^(2i / head_dim), then ÷ the linear scaling factor. torch
    rounds base^(2i/d) to float32 (correctly, but for rare one-ulp misses of its vectorised pow) and divides in
    float32; the power is taken here in float64 and rounded once, which is what torch gets almost everywhere."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    powers = (np.float64(np.float32(rope.theta)) ** exponents.astype(np.float64)).astype(np.float32)
    inverse = np.float32(1.0) / powers
    return (inverse / np.float32(rope.factor)).astype(np.float32)


class RoPE:
    """One layer type's rotary embedding over the whole head_dim, split-half ("non-traditional") layout."""

    def __init__(self, head_dim: int, rope: RopeConfig):
        self.inverse = mx.array(inverse_frequencies(head_dim, rope))

    def rotation(self, offset, length: int, dtype: mx.Dtype) -> Rotation:
        """The tables for `length` positions from `offset`: an int, or an array [B] (one offset per batch row,
        giving tables [B, 1, L, head_dim] that broadcast over the heads)."""
        steps = mx.arange(length)
        if isinstance(offset, mx.array):
            positions = (offset[:, None] + steps[None])[:, None, :, None]
        else:
            positions = (steps + offset)[:, None]
        angles = positions.astype(mx.float32) * self.inverse
        cos, sin = mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)
        return Rotation(mx.concatenate([cos, cos], axis=-1), mx.concatenate([-sin, sin], axis=-1))


def rotate(x: mx.array, rotation: Rotation) -> mx.array:
    """x [B, heads, L, head_dim] turned by its positions' angles: x·cos + rotate_half(x)·sin, in x's dtype."""
    half = x.shape[-1] // 2
    swapped = mx.concatenate([x[..., half:], x[..., :half]], axis=-1)
    return x * rotation.cos + swapped * rotation.sin
