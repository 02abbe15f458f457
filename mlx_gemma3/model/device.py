"""What depends on the device MLX computes on: whether it is the CPU, and the compute dtype.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import mlx.core as mx

from .config import FLOAT_DTYPES

FLOAT_TYPES = tuple(getattr(mx, name) for name in FLOAT_DTYPES)  # the same dtypes as MLX types


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def default_compute_dtype() -> mx.Dtype:
    """float32 on the CPU (MLX's CPU kernels are slow in half precision), bfloat16 on a GPU."""
    return mx.float32 if on_cpu() else mx.bfloat16
