"""KV caches: a growing cache for full-attention layers, a window-bounded cache for sliding layers."""

from __future__ import annotations

import mlx.core as mx


REWIND = 16  # tokens a sliding cache keeps beyond its window so trim() works after the window slides


def attention_mask(length: int, offset: int, window: int | None, start: int = 0) -> mx.array:
    """Boolean mask of queries offset… against held keys start…offset+length−1: causal, within `window` if given."""
    queries = mx.arange(offset, offset + length)[:, None]
    keys = mx.arange(start, offset + length)[None]
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
        self.offset += keys.shape[2]
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values = keys, values
        return keys, values

    def trim(self, n: int) -> int:
        n = min(n, self.trimmable())
        self.offset -= n
        self.keys, self.values = self.keys[:, :, : self.held() - n], self.values[:, :, : self.held() - n]
        return n

    def trimmable(self) -> int:
        return self.offset


class SlidingKVCache(KVCache):
    """Holds at most window − 1 + rewind keys between calls (W + chunk + rewind during one)."""

    def __init__(self, window: int, rewind: int = REWIND):
        super().__init__()
        self.window, self.rewind = window, rewind
        self.keep = window - 1 + rewind

    def make_mask(self, length: int) -> mx.array:
        return attention_mask(length, self.offset, self.window, start=self.offset - self.held())

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        keys, values = super().update_and_fetch(keys, values)
        self.keys, self.values = keys[:, :, -self.keep :], values[:, :, -self.keep :]
        return keys, values

    def trimmable(self) -> int:
        """Everything before the window first slides; afterwards at most `rewind` tokens."""
        return self.offset if self.held() == self.offset else self.held() - (self.window - 1)


def make_cache(layers, window: int) -> list:
    """One cache per decoder layer: sliding layers get the window-bounded cache."""
    return [SlidingKVCache(window) if layer.is_sliding else KVCache() for layer in layers]
