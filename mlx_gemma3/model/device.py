"""What depends on the device MLX computes on: which paths the runtime takes, and the compute dtype.

On the CPU the runtime takes the CPU's paths: float32 compute, float32 matrices held column-major, prompt chunks
attended through the composed `k·qᵀ` product. Elsewhere (Metal) it takes the GPU's: bfloat16, row-major weights,
MLX's fused attention. Setting the environment variable MLX_GEMMA3_GPU_CHOICES=1 makes a CPU process take the
GPU's paths too (MLX's fused kernels have CPU fallbacks), so that every branch a Mac runs can be tested here; it
is read at each decision, so set it before `load`."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .cache import SINK_TOKENS
from .config import FLOAT_DTYPES, TextConfig
from .memory import fitting_kv_size, kv_bytes, kv_value_bytes, weight_bytes
from .quantize import DEFAULT_GROUP_SIZE

__all__ = ["bound_buffer_cache", "wired_limit"]

FLOAT_TYPES = tuple(getattr(mx, name) for name in FLOAT_DTYPES)  # the same dtypes as MLX types
GPU_CHOICES = "MLX_GEMMA3_GPU_CHOICES"  # "1": take the GPU's paths on the CPU as well


def on_cpu() -> bool:
    """Whether to take the CPU's paths: MLX computes on the CPU and MLX_GEMMA3_GPU_CHOICES is not "1"."""
    return mx.default_device().type == mx.DeviceType.cpu and os.environ.get(GPU_CHOICES) != "1"


def default_compute_dtype() -> mx.Dtype:
    """float32 on the CPU (MLX's CPU kernels are slow in half precision), bfloat16 on a GPU."""
    return mx.float32 if on_cpu() else mx.bfloat16


# Memory habits a Mac needs (mlx-lm's): wire the model's memory while generating and bound MLX's buffer cache. The
# library never applies them on its own: command lines do (or a caller that asks), since both are process-wide.
CLOSE_TO_WORKING_SET = 0.9  # mlx-lm warns when the model needs more than this share of the working set
CACHE_SHARE = 0.25  # the server's buffer cache: at most this share of the memory the weights leave


def recommended_working_set() -> int | None:
    """Bytes the GPU can keep resident without slowing down (Metal's recommendation); None on the CPU."""
    return mx.device_info().get("max_recommended_working_set_size")


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_warning(
    cfg: TextConfig,
    weights: int,
    tokens: int,
    value_bytes: float,
    working_set: int,
    how: str = "--max-kv-size {n}",
    rows: int = 1,
    max_kv_size: int | None = None,
) -> str | None:
    """One warning line, or None: the model alone is close to the working set (as mlx-lm warns), or the model and
    the KV caches of `rows` sequences of `tokens` tokens do not fit in it, naming a cache bound whose KV fills 90 %
    of the room the weights leave (`how` says how to set it, {n} standing for the size)."""
    mb = 2**20
    if weights > CLOSE_TO_WORKING_SET * working_set:
        return (
            f"warning: the model needs {weights // mb} MB, close to the GPU's recommended working set of "
            f"{working_set // mb} MB: generation may be slow (a smaller or more quantized model fits better)"
        )
    kv = rows * kv_bytes(cfg, tokens, value_bytes, max_kv_size)
    if weights + kv <= working_set:
        return None
    room = CLOSE_TO_WORKING_SET * (working_set - weights) / rows  # the rest: activations, the buffer cache
    fits = fitting_kv_size(cfg, room, value_bytes)
    advice = f"pass {how.format(n=fits)} to bound the cache" if fits > SINK_TOKENS else "use a smaller model"
    what = f"its KV cache at {tokens} tokens" + (f" × {rows} sequences" if rows > 1 else "")
    return (
        f"warning: the model ({weights // mb} MB) and {what} ({kv // mb} MB) need more than the GPU's recommended "
        f"working set of {working_set // mb} MB: {advice}"
    )


def wire_memory(
    model: nn.Module,
    tokens: int,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_GROUP_SIZE,
    max_kv_size: int | None = None,
    how: str = "--max-kv-size {n}",
    rows: int = 1,
    working_set: int | None = None,
) -> int | None:
    """Wire memory up to the device's recommended working set, as mlx-lm does while it generates, after one warning
    line on stderr if the model, or the model and its KV at `tokens` tokens, would not fit (`memory_warning`).
    Returns the previous limit; None, having done nothing, where the device reports no working set (the CPU)
    and none is given. Process-wide: for command lines."""
    working_set = working_set or recommended_working_set()
    if working_set is None:
        return None
    value_bytes = kv_value_bytes(compute_dtype_of(model), kv_bits, kv_group_size)
    warning = memory_warning(
        model.config.text, weight_bytes(model), tokens, value_bytes, working_set, how, rows, max_kv_size
    )
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return mx.set_wired_limit(working_set)


@contextmanager
def wired_limit(
    model: nn.Module,
    tokens: int,
    streams=(),
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_GROUP_SIZE,
    max_kv_size: int | None = None,
    working_set: int | None = None,
):
    """`wire_memory` while inside (its warning names --max-kv-size); the old limit comes back on exit, once
    `streams` (and the default stream) have finished their work."""
    old = wire_memory(model, tokens, kv_bits, kv_group_size, max_kv_size, working_set=working_set)
    try:
        yield
    finally:
        if old is not None:
            for stream in streams:
                mx.synchronize(stream)
            mx.synchronize()
            mx.set_wired_limit(old)


def compute_dtype_of(model: nn.Module) -> mx.Dtype:
    """The dtype the model computes in: its float parameters' (load casts them all to it)."""
    return next(v.dtype for _, v in tree_flatten(model.parameters()) if v.dtype in FLOAT_TYPES)


def buffer_cache_limit(weights: int, memory: int) -> int:
    """The bound a long-running server puts on MLX's buffer cache: a quarter of the memory the weights leave.
    Freed buffers (a long prompt's activations, a finished request's KV) are kept for reuse up to this much
    instead of up to MLX's default (its memory limit: 1.5 × the working set on Metal)."""
    return max(int(CACHE_SHARE * (memory - weights)), 0)


def bound_buffer_cache(model: nn.Module, memory: int | None = None) -> int:
    """Bound MLX's buffer cache by `buffer_cache_limit` (memory: the working set on Metal, the machine's RAM on the
    CPU), never above the bound MLX already has (on the CPU MLX keeps at most 32 MB); returns the bound now in
    force. Process-wide: for command lines."""
    memory = memory or recommended_working_set() or physical_memory()
    limit = buffer_cache_limit(weight_bytes(model), memory)
    previous = mx.set_cache_limit(limit)
    if previous < limit:
        mx.set_cache_limit(previous)
    return min(previous, limit)
