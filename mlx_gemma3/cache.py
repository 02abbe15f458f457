"""KV caches: a growing cache for full-attention layers, a window-bounded cache for sliding layers."""

from __future__ import annotations

import mlx.core as mx


REWIND = 16  # tokens a sliding cache keeps beyond its window so trim() works after the window slides


def attention_mask(length: int, offset: int, window: int | None) -> mx.array:
    """Boolean [length, offset + length] mask: causal, and for sliding layers the last `window` keys."""
    queries = mx.arange(offset, offset + length)[:, None]
    keys = mx.arange(offset + length)[None]
    mask = keys <= queries
    if window is not None:
        mask = mask & (keys > queries - window)
    return mask


class KVCache:
    """Keeps every key and value (full-attention layers)."""

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def held(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def make_mask(self, length: int) -> mx.array:
        return attention_mask(length, self.offset, None)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values = keys, values
        self.offset = keys.shape[2]
        return keys, values

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        self.offset -= n
        self.keys, self.values = self.keys[:, :, : self.offset], self.values[:, :, : self.offset]
        return n


class SlidingKVCache:
    """Holds at most window − 1 + rewind keys between calls (W + chunk + rewind during one)."""

    def __init__(self, window: int, rewind: int = REWIND):
        self.window, self.rewind = window, rewind
        self.keep = window - 1 + rewind
        self.keys = self.values = None
        self.offset = 0

    def held(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def make_mask(self, length: int) -> mx.array:
        start = self.offset - self.held()
        queries = mx.arange(self.offset, self.offset + length)[:, None]
        keys = mx.arange(start, self.offset + length)[None]
        return (keys <= queries) & (keys > queries - self.window)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2] - self.held()
        self.keys, self.values = keys[:, :, -self.keep :], values[:, :, -self.keep :]
        return keys, values

    def trim(self, n: int) -> int:
        """Forget the last n tokens; at most `rewind` once the window has slid past the start."""
        limit = self.offset if self.held() == self.offset else self.held() - (self.window - 1)
        n = min(n, limit)
        self.offset -= n
        self.keys, self.values = self.keys[:, :, : self.held() - n], self.values[:, :, : self.held() - n]
        return n


def make_cache(layers, window: int) -> list:
    """One cache per decoder layer: sliding layers get the window-bounded cache."""
    return [SlidingKVCache(window) if layer.is_sliding else KVCache() for layer in layers]
