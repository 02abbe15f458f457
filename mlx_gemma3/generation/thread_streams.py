"""One MLX stream per thread for generation, made on first use and kept (never a new stream per call)."""

from __future__ import annotations

import threading

import mlx.core as mx

__all__ = ["generation_stream", "release_thread_streams"]

_local = threading.local()  # per thread: {device name: stream}; nothing is created until a thread asks


def generation_stream() -> mx.Stream:
    """This thread's generation stream on the default device. MLX streams belong to the thread that made them,
    and on Metal each is a command queue that MLX cannot make without limit, so a thread makes one and keeps it."""
    streams = _local.__dict__.setdefault("streams", {})
    device = mx.default_device()
    key = str(device)
    if key not in streams:
        streams[key] = mx.new_stream(device)
    return streams[key]


def release_thread_streams() -> None:
    """Drop every MLX stream of this thread (call it before a thread that ran MLX work ends, and before a
    command line exits: MLX's own exit-time cleanup runs too late). The thread may run MLX work again later."""
    _local.__dict__.pop("streams", None)
    mx.clear_streams()
