"""KV caches behind one protocol (`Cache`): growing (full layers), rotating (sliding layers), optionally quantized,
and `BatchCache`, several sequences as left-padded rows; prompt-cache files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx

from ..errors import Gemma3Error
from .quantize import DEFAULT_GROUP_SIZE, KV_BITS

__all__ = [
    "Cache",
    "batch_cache",
    "extract_cache",
    "filter_cache",
    "left_padded",
    "load_prompt_cache",
    "merge_caches",
    "save_prompt_cache",
]

REWIND = 16  # tokens a sliding cache keeps beyond its window so trim() works after the ring has wrapped
STEP = 256  # full caches grow by this many slots at a time
SINK_TOKENS = 4  # first tokens a cache bounded by max_kv_size never evicts (as mlx-lm's rotating cache)
PROMPT_CACHE_FORMAT = "mlx_gemma3.prompt_cache/2"
OLD_PROMPT_CACHE_FORMATS = ("mlx_gemma3.prompt_cache/1",)


def attention_mask(length: int, offset: int, window: int | None, start: int = 0, blocks=None) -> mx.array:
    """Mask of queries offset… against contiguous keys start…offset+length−1 (see `build_mask`)."""
    return build_mask(mx.arange(start, offset + length), None, offset, length, window, blocks)


def build_mask(keys: mx.array, valid, offset: int, length: int, window: int | None, blocks=None) -> mx.array:
    """Boolean mask of queries at positions offset… against keys at positions `keys` [K], among `valid` keys:
    causal, or in the query's own image block (`blocks` [B, length], −1 outside images: tokens of one
    image see each other both ways); and no further back than `window`, as transformers composes them.
    Shape [length, K], or [B, 1, length, K] with blocks."""
    queries = mx.arange(offset, offset + length)[:, None]
    mask = keys[None] <= queries
    if blocks is not None:
        mask = (mask[None] | same_image(keys, offset, blocks))[:, None]
    if window is not None:
        mask = mask & (keys[None] > queries - window)
    return mask if valid is None else mask & valid


def same_image(keys: mx.array, offset: int, blocks: mx.array) -> mx.array:
    """[B, L, K]: the query and the key belong to the same image block of this chunk."""
    length = blocks.shape[1]
    in_chunk = (keys >= offset) & (keys < offset + length)
    key_blocks = mx.where(in_chunk, mx.take(blocks, mx.clip(keys - offset, 0, length - 1), axis=1), -1)
    return (blocks[:, :, None] == key_blocks[:, None, :]) & (blocks[:, :, None] >= 0)


class KVStore:
    """How keys or values are held: as they come (float) or as affine-quantized groups."""

    def __init__(self, bits: int | None = None, group_size: int = DEFAULT_GROUP_SIZE):
        if bits is not None and bits not in KV_BITS:
            raise Gemma3Error(f"KV cache bits must be one of {KV_BITS}, got {bits}")
        self.bits, self.group_size = bits, group_size

    def encode(self, x: mx.array) -> tuple[mx.array, ...]:
        if self.bits is None:
            return (x,)
        if x.shape[-1] % self.group_size:
            raise Gemma3Error(
                f"head_dim {x.shape[-1]} is not divisible by the KV group size {self.group_size}: "
                "pick a group size that divides it"
            )
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def decode(self, parts: tuple[mx.array, ...]) -> mx.array:
        if self.bits is None:
            return parts[0]
        return mx.dequantize(*parts, group_size=self.group_size, bits=self.bits)


def write(buffers: tuple[mx.array, ...], start: int, parts: tuple[mx.array, ...]) -> None:
    for buffer, part in zip(buffers, parts):
        buffer[:, :, start : start + part.shape[2]] = part


def grown(buffers: tuple[mx.array, ...] | None, template: tuple[mx.array, ...], slots: int) -> tuple[mx.array, ...]:
    """`buffers` extended along the sequence axis to `slots` (zeros shaped like `template` when None)."""
    out = []
    for i, part in enumerate(template):
        have = 0 if buffers is None else buffers[i].shape[2]
        pad = mx.zeros((*part.shape[:2], slots - have, *part.shape[3:]), dtype=part.dtype)
        out.append(pad if buffers is None else mx.concatenate([buffers[i], pad], axis=2))
    return tuple(out)


def sliced(buffers: tuple[mx.array, ...], start: int, stop: int) -> tuple[mx.array, ...]:
    return tuple(b[:, :, start:stop] for b in buffers)


def taken(buffers: tuple[mx.array, ...], slots: mx.array) -> tuple[mx.array, ...]:
    return tuple(mx.take(b, slots, axis=2) for b in buffers)


def joined(a: tuple[mx.array, ...], b: tuple[mx.array, ...]) -> tuple[mx.array, ...]:
    return tuple(mx.concatenate([x, y], axis=2) for x, y in zip(a, b))


class Cache:
    """The protocol every cache follows; generation, prompt-cache files and batching use only this.

    - `offset`: position of the next token: an int, or an array [B] (one per row) for a batch.
    - `update_and_fetch(keys, values)`: store a chunk [B, KV heads, L, D]; return the keys and values its
      queries attend to. `make_mask(length, blocks)`: the mask over exactly those keys (None: see all).
    - `state`: the arrays, keys and values included (cheap: evaluating it after a prefill chunk costs
      nothing more); `meta_state`: ints and strings that say how to read them (JSON-serialisable);
      `from_state(state, meta_state)` rebuilds the cache. Both are settable.
    - `trimmable()`: how many of the last tokens can be forgotten; `is_trimmable(n)`; `trim(n)` forgets as
      many of the last n as it can and returns how many.
    - `copy()`: a snapshot that later writes to either cache do not reach. `nbytes`: bytes held.
    - `rows()`: the single-sequence caches this cache holds (itself, for one sequence).
    """

    window: int | None = None

    @property
    def state(self) -> tuple[mx.array, ...]:
        raise NotImplementedError

    @state.setter
    def state(self, arrays: tuple[mx.array, ...]) -> None:
        raise NotImplementedError

    @property
    def meta_state(self) -> dict:
        raise NotImplementedError

    @meta_state.setter
    def meta_state(self, meta: dict) -> None:
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: tuple[mx.array, ...], meta_state: dict) -> Cache:
        cache = cls.__new__(cls)
        cache.meta_state = meta_state
        cache.state = state
        return cache

    def copy(self) -> Cache:
        # new array objects: MLX writes a slice in place into the object it is given, never into another one
        return type(self).from_state(tuple(mx.array(a) for a in self.state), self.meta_state)

    def trimmable(self) -> int:
        raise NotImplementedError

    def is_trimmable(self, n: int) -> bool:
        return n <= self.trimmable()

    def trim(self, n: int) -> int:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def make_mask(self, length: int, blocks: mx.array | None = None) -> mx.array | None:
        raise NotImplementedError

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        raise NotImplementedError

    def rows(self) -> list[Cache]:
        return [self]


class KVCache(Cache):
    """Full-attention layers: keeps every key and value in buffers preallocated STEP slots at a time."""

    POSITION = ("offset",)  # the meta_state entries that say where the cache stands (the rest: its layout)

    def __init__(self, bits: int | None = None, group_size: int = DEFAULT_GROUP_SIZE):
        self.store = KVStore(bits, group_size)
        self.keys = self.values = None
        self.offset = 0

    def layout(self) -> dict:
        """The constructor's arguments: what caches must share to be rows of one batch."""
        return {"bits": self.store.bits, "group_size": self.store.group_size}

    def blank(self) -> KVCache:
        """An empty cache of the same layout."""
        return type(self)(**self.layout())

    @property
    def meta_state(self) -> dict:
        return {**self.layout(), **{name: getattr(self, name) for name in self.POSITION}}

    @meta_state.setter
    def meta_state(self, meta: dict) -> None:
        self.__init__(**{name: value for name, value in meta.items() if name not in self.POSITION})
        for name in self.POSITION:
            setattr(self, name, meta[name])

    @property
    def state(self) -> tuple[mx.array, ...]:
        if self.keys is None:
            return ()
        keys, values = self.ordered()
        return (*keys, *values)

    @state.setter
    def state(self, arrays: tuple[mx.array, ...]) -> None:
        half = len(arrays) // 2
        self.keys, self.values = (tuple(arrays[:half]), tuple(arrays[half:])) if arrays else (None, None)

    def held(self) -> int:
        """Keys attended to by the next query (the stored token count)."""
        return self.offset

    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    def key_positions(self, length: int) -> tuple[mx.array, mx.array | None]:
        """Positions of the keys the next update of `length` tokens returns, and which of them are valid."""
        return mx.arange(0, self.offset + length), None

    def make_mask(self, length: int, blocks: mx.array | None = None) -> mx.array | None:
        keys, valid = self.key_positions(length)
        if length == 1 and blocks is None and valid is None and self.sees_all(keys.size):
            return None
        return build_mask(keys, valid, self.offset, length, self.window, blocks)

    def sees_all(self, key_count: int) -> bool:
        """Whether the next single query sees every one of `key_count` contiguous keys."""
        return self.window is None or key_count <= self.window

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        keys, values = self.store.encode(keys), self.store.encode(values)
        end = self.offset + keys[0].shape[2]
        if end > self.capacity():
            slots = -(-end // STEP) * STEP
            self.keys = grown(self.keys and sliced(self.keys, 0, self.offset), keys, slots)
            self.values = grown(self.values and sliced(self.values, 0, self.offset), values, slots)
        write(self.keys, self.offset, keys)
        write(self.values, self.offset, values)
        self.offset = end
        return self.fetch()

    def fetch(self) -> tuple[mx.array, mx.array]:
        decode = self.store.decode
        return decode(sliced(self.keys, 0, self.offset)), decode(sliced(self.values, 0, self.offset))

    def trimmable(self) -> int:
        return self.offset

    def trim(self, n: int) -> int:
        n = min(n, self.trimmable())
        self.offset -= n
        return n

    def ordered(self) -> tuple[tuple[mx.array, ...], tuple[mx.array, ...]]:
        """Held keys and values (stored form) oldest first."""
        return sliced(self.keys, 0, self.offset), sliced(self.values, 0, self.offset)

    def restore(self, keys: tuple[mx.array, ...], values: tuple[mx.array, ...], offset: int) -> None:
        """Hold `keys` and `values` (stored form, oldest first) as the last tokens before `offset`."""
        self.keys, self.values, self.offset = keys, values, offset

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in (*(self.keys or ()), *(self.values or ())))


class SlidingKVCache(KVCache):
    """Sliding-window layers: a ring of window − 1 + rewind slots; a chunk call sees at most W + chunk + rewind keys."""

    POSITION = ("offset", "count", "idx")

    def __init__(
        self, window: int, rewind: int = REWIND, bits: int | None = None, group_size: int = DEFAULT_GROUP_SIZE
    ):
        super().__init__(bits, group_size)
        self.window, self.rewind = window, rewind
        self.slots = window - 1 + rewind
        self.count = 0  # valid slots
        self.idx = 0  # next slot to write

    def layout(self) -> dict:
        return {"window": self.window, "rewind": self.rewind, **super().layout()}

    @KVCache.state.getter
    def state(self) -> tuple[mx.array, ...]:
        return () if self.keys is None else (*self.keys, *self.values)  # the ring as it lies

    def held(self) -> int:
        return self.count

    def writes_in_place(self, length: int) -> bool:
        """One token, or a chunk that fits the free slots: written into the ring; otherwise the ring is rebuilt."""
        if self.keys is None:
            return length <= self.slots
        return length == 1 or (self.idx + length <= self.slots and self.count + length <= self.slots)

    def key_positions(self, length: int) -> tuple[mx.array, mx.array | None]:
        if not self.writes_in_place(length):
            return mx.arange(self.offset - self.count, self.offset + length), None
        offset, idx = self.offset + length, (self.idx + length) % self.slots
        count = min(self.count + length, self.slots)
        if in_order(idx, count, self.slots):
            return mx.arange(offset - count, offset), None
        positions = offset - 1 - (idx - 1 - mx.arange(self.slots)) % self.slots
        return positions, positions >= offset - count

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        length = keys.shape[2]
        in_place = self.writes_in_place(length)
        keys, values = self.store.encode(keys), self.store.encode(values)
        if in_place:
            if self.keys is None:
                self.keys, self.values = grown(None, keys, self.slots), grown(None, values, self.slots)
            write(self.keys, self.idx, keys)
            write(self.values, self.idx, values)
            self.advance(length)
            if in_order(self.idx, self.count, self.slots):  # before the ring wraps: only the filled slots
                return self.store.decode(sliced(self.keys, 0, self.count)), self.store.decode(
                    sliced(self.values, 0, self.count)
                )
            return self.store.decode(self.keys), self.store.decode(self.values)
        all_keys, all_values = keys, values
        if self.keys is not None:
            old_keys, old_values = self.ordered()
            all_keys, all_values = joined(old_keys, keys), joined(old_values, values)
        keep = min(self.count + length, self.slots)
        self.keys = grown(sliced(all_keys, -keep, None), keys, self.slots)
        self.values = grown(sliced(all_values, -keep, None), values, self.slots)
        self.offset, self.count, self.idx = self.offset + length, keep, keep % self.slots
        return self.store.decode(all_keys), self.store.decode(all_values)

    def advance(self, length: int) -> None:
        self.offset += length
        self.count = min(self.count + length, self.slots)
        self.idx = (self.idx + length) % self.slots

    def ordered(self):
        slots = (self.idx - self.count + mx.arange(self.count)) % self.slots
        return taken(self.keys, slots), taken(self.values, slots)

    def trimmable(self) -> int:
        """Everything before the window first slides; afterwards at most `rewind` tokens."""
        return self.count if self.count == self.offset else max(self.count - (self.window - 1), 0)

    def trim(self, n: int) -> int:
        n = super().trim(n)
        self.count -= n
        self.idx = (self.idx - n) % self.slots
        return n

    def restore(self, keys, values, offset: int) -> None:
        self.count = keys[0].shape[2]
        if self.count > self.slots:
            raise Gemma3Error(f"a sliding cache of {self.slots} slots cannot hold {self.count} saved tokens")
        self.keys, self.values = grown(keys, keys, self.slots), grown(values, values, self.slots)
        self.offset, self.idx = offset, self.count % self.slots


class BoundedKVCache(Cache):
    """A layer bounded by `max_kv_size`: the first `keep` tokens (attention sinks, never evicted) and a rotating
    window of the latest `max_size − keep`. Without the sinks a model whose first tokens slid out of reach
    degenerates into repetition; mlx-lm's rotating cache keeps 4 for the same reason."""

    def __init__(
        self,
        max_size: int,
        keep: int = SINK_TOKENS,
        bits: int | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        rewind: int = REWIND,
    ):
        if max_size <= keep:
            raise Gemma3Error(
                f"max_kv_size must be more than {keep} (the first {keep} tokens are always kept), got {max_size}"
            )
        self.max_size, self.keep = max_size, keep
        self.sinks = KVCache(bits, group_size)
        self.recent = SlidingKVCache(max_size - keep, rewind, bits, group_size)  # counts from the sinks' end

    @property
    def offset(self) -> int:
        return self.sinks.offset + self.recent.offset

    def held(self) -> int:
        return self.sinks.offset + self.recent.held()

    def layout(self) -> dict:
        return {"max_size": self.max_size, "keep": self.keep, **self.sinks.layout()}

    @property
    def meta_state(self) -> dict:
        meta = {**self.layout(), "sinks": self.sinks.meta_state, "recent": self.recent.meta_state}
        return {**meta, "sink_arrays": len(self.sinks.state)}

    @meta_state.setter
    def meta_state(self, meta: dict) -> None:
        self.__init__(**{name: meta[name] for name in ("max_size", "keep", "bits", "group_size")})
        self.sinks.meta_state, self.recent.meta_state = meta["sinks"], meta["recent"]
        self._sink_arrays = meta["sink_arrays"]

    @property
    def state(self) -> tuple[mx.array, ...]:
        return (*self.sinks.state, *self.recent.state)

    @state.setter
    def state(self, arrays: tuple[mx.array, ...]) -> None:
        split = getattr(self, "_sink_arrays", len(self.sinks.state))
        self.sinks.state, self.recent.state = tuple(arrays[:split]), tuple(arrays[split:])

    def to_sinks(self, length: int) -> int:
        """How many of the next `length` tokens still go to the sinks."""
        return max(0, min(self.keep - self.sinks.offset, length))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        first = self.to_sinks(keys.shape[2])
        if first:
            self.sinks.update_and_fetch(keys[:, :, :first], values[:, :, :first])
        sink_keys, sink_values = self.sinks.fetch()
        if first == keys.shape[2]:
            return sink_keys, sink_values
        recent_keys, recent_values = self.recent.update_and_fetch(keys[:, :, first:], values[:, :, first:])
        return mx.concatenate([sink_keys, recent_keys], axis=2), mx.concatenate([sink_values, recent_values], axis=2)

    def make_mask(self, length: int, blocks: mx.array | None = None) -> mx.array | None:
        """Causal over the sinks; causal and within `max_size − keep` over the rest."""
        first = self.to_sinks(length)
        rest = length - first
        if length == 1 and blocks is None and rest == 1 and self.recent.make_mask(1) is None:
            return None
        parts = [build_mask(mx.arange(0, self.sinks.offset + first), None, self.offset, length, None, blocks)]
        if rest:
            keys, valid = self.recent.key_positions(rest)
            parts.append(build_mask(keys + self.keep, valid, self.offset, length, self.recent.window, blocks))
        return mx.concatenate(parts, axis=-1)

    def trimmable(self) -> int:
        recent = self.recent.trimmable()
        return recent + self.sinks.offset if recent == self.recent.offset else recent

    def trim(self, n: int) -> int:
        trimmed = self.recent.trim(n)
        if trimmed < n and self.recent.offset == 0:
            trimmed += self.sinks.trim(n - trimmed)
        return trimmed


def in_order(idx: int, count: int, slots: int) -> bool:
    """Whether a ring's valid slots are 0…count−1, oldest first (it has not wrapped, or wrapped exactly)."""
    return (idx - count) % slots == 0


class BatchCache(Cache):
    """B sequences as the rows of one cache of any kind (`inner`), on a shared timeline of slots: row b is
    left-padded by `padding[b]` slots (its token at position p lies in slot p + padding[b]) and holds keys
    from slot `first[b]` on (later than its padding when the row had slid past its window before it joined).
    `offset` is an array [B]: RoPE turns each row by its own positions; the mask is built per row.

    Make one with `batch_cache` (empty, for left-padded prompts) or `BatchCache.merge`; take rows out with
    `extract` / `filter`, add some with `merge`."""

    def __init__(self, inner: KVCache, padding, first=None):
        self.inner = inner
        self.padding = mx.array(padding, dtype=mx.int32)
        self.first = self.padding if first is None else mx.array(first, dtype=mx.int32)

    @property
    def offset(self) -> mx.array:
        return self.inner.offset - self.padding

    @property
    def window(self) -> int | None:
        return self.inner.window

    @property
    def batch_size(self) -> int:
        return self.padding.size

    @property
    def state(self) -> tuple[mx.array, ...]:
        return (*self.inner.state, self.padding, self.first)

    @state.setter
    def state(self, arrays: tuple[mx.array, ...]) -> None:
        self.inner.state = tuple(arrays[:-2])
        self.padding, self.first = arrays[-2:]

    @property
    def meta_state(self) -> dict:
        return {"inner": type(self.inner).__name__, **self.inner.meta_state}

    @meta_state.setter
    def meta_state(self, meta: dict) -> None:
        inner = {name: value for name, value in meta.items() if name != "inner"}
        self.inner = cache_class(meta["inner"]).from_state((), inner)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return self.inner.update_and_fetch(keys, values)

    def make_mask(self, length: int, blocks: mx.array | None = None) -> mx.array:
        """[B, 1, length, K]: the inner cache's mask, less each row's padding (a padding query sees only itself)."""
        keys, valid = self.inner.key_positions(length)
        end = self.inner.offset
        mask = build_mask(keys, valid, end, length, self.window, blocks)
        itself = keys[None] == mx.arange(end, end + length)[:, None]
        own = (keys[None, None] >= self.first[:, None, None]) | itself[None]
        return mask & own[:, None]

    def trimmable(self) -> int:
        """The inner cache's limit, and no row may lose all its keys or, if it had slid, one its next query needs."""
        end, limit = self.inner.offset, self.inner.trimmable()
        for pad, first in zip(self.padding.tolist(), self.first.tolist()):
            slid = first > pad
            limit = min(limit, end - first - (self.window - 1 if slid else 0))
        return max(limit, 0)

    def trim(self, n: int) -> int:
        return self.inner.trim(min(n, self.trimmable()))

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes + self.padding.nbytes + self.first.nbytes

    def rows(self) -> list[KVCache]:
        return [self.extract(row) for row in range(self.batch_size)]

    def extract(self, row: int) -> KVCache:
        """Row `row` as a single-sequence cache, its padding dropped."""
        single = self.inner.blank()
        end, pad, first = self.inner.offset, self.padding[row].item(), self.first[row].item()
        kept = min(self.inner.held(), end - first)
        if kept > 0:
            keys, values = self.inner.ordered()
            single.restore(row_tail(keys, row, kept), row_tail(values, row, kept), end - pad)
        return single

    def filter(self, rows: list[int]) -> BatchCache:
        """A batch of only these rows, in this order (the padding they no longer need dropped)."""
        return BatchCache.merge([self.extract(row) for row in rows])

    @classmethod
    def merge(cls, caches: list[Cache]) -> BatchCache:
        """One batch of every row of `caches` (single or batch caches of one kind and layout), right-aligned."""
        rows = [row for cache in caches for row in cache.rows()]
        refuse_unbatchable(rows)
        if len({(type(row), tuple(row.layout().items())) for row in rows}) != 1:
            raise Gemma3Error("only caches of one kind and layout (window, KV bits, group size) can share a batch")
        end, held = max(row.offset for row in rows), max(row.held() for row in rows)
        inner = rows[0].blank()
        if held:
            parts = stacked_rows(rows, held)
            inner.restore(*parts, end)
        return cls(inner, [end - row.offset for row in rows], [end - row.held() for row in rows])


def refuse_unbatchable(caches: list[Cache]) -> None:
    if any(not isinstance(cache, KVCache) for cache in caches):
        raise Gemma3Error("caches bounded by max_kv_size cannot be batched: batch without max_kv_size")


def row_tail(buffers: tuple[mx.array, ...], row: int, length: int) -> tuple[mx.array, ...]:
    return tuple(mx.contiguous(b[row : row + 1, :, b.shape[2] - length :]) for b in buffers)


def stacked_rows(rows: list[KVCache], slots: int) -> tuple[tuple[mx.array, ...], tuple[mx.array, ...]]:
    """Every row's held keys and values (stored form) left-padded with zeros to `slots`, stacked as rows [B, …]."""
    template = next(row for row in rows if row.held()).ordered()
    stacked = []
    for side in range(2):
        per_row = []
        for row in rows:
            parts = row.ordered()[side] if row.held() else tuple(p[:, :, :0] for p in template[side])
            per_row.append(tuple(with_leading_zeros(p, slots) for p in parts))
        stacked.append(tuple(mx.concatenate(list(part), axis=0) for part in zip(*per_row)))
    return stacked[0], stacked[1]


def with_leading_zeros(part: mx.array, slots: int) -> mx.array:
    pad = mx.zeros((*part.shape[:2], slots - part.shape[2], *part.shape[3:]), dtype=part.dtype)
    return mx.concatenate([pad, part], axis=2)


CACHE_CLASSES = {cls.__name__: cls for cls in (KVCache, SlidingKVCache, BoundedKVCache, BatchCache)}


def cache_class(name: str) -> type[Cache]:
    if name not in CACHE_CLASSES:
        raise Gemma3Error(f"unknown cache class {name!r} (known: {', '.join(CACHE_CLASSES)})")
    return CACHE_CLASSES[name]


def make_cache(
    layers,
    window: int,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_GROUP_SIZE,
    max_kv_size: int | None = None,
    rewind: int = REWIND,
) -> list[KVCache]:
    """One cache per decoder layer: sliding layers get the rotating cache, full layers a growing one. Rotating
    caches can trim up to `rewind` tokens after their ring wrapped (speculative decoding needs its draft length + 1)."""
    if max_kv_size is not None and max_kv_size < 1:
        raise Gemma3Error(f"max_kv_size must be a positive number of tokens, got {max_kv_size}")
    if rewind < 1:
        raise Gemma3Error(f"rewind must be at least 1 token, got {rewind}")

    def cache_for(layer) -> KVCache:
        bounded = max_kv_size is not None and (not layer.is_sliding or max_kv_size < window)
        if bounded:
            return BoundedKVCache(max_kv_size, bits=kv_bits, group_size=kv_group_size, rewind=rewind)
        if layer.is_sliding:
            return SlidingKVCache(window, rewind, kv_bits, kv_group_size)
        return KVCache(bits=kv_bits, group_size=kv_group_size)

    return [cache_for(layer) for layer in layers]


def same_layers(cache: list[Cache], other: list[Cache]) -> bool:
    """Whether two caches have the same layers: count, class and window (a loaded file fits this model)."""
    return [(type(c), c.window) for c in cache] == [(type(c), c.window) for c in other]


def left_padded(prompts: list[list[int]], pad_id: int = 0) -> tuple[mx.array, list[int]]:
    """Prompts of different lengths as one [B, L] array, each padded on the left, and each row's padding."""
    longest = max(len(prompt) for prompt in prompts)
    padding = [longest - len(prompt) for prompt in prompts]
    return mx.array([[pad_id] * pad + list(prompt) for pad, prompt in zip(padding, prompts)]), padding


def batch_cache(cache: list[KVCache], padding: list[int]) -> list[BatchCache]:
    """A model's empty caches (`model.make_cache(...)`) as one batch for prompts left-padded by `padding` each."""
    refuse_unbatchable(cache)
    if any(layer.offset for layer in cache):
        raise Gemma3Error("batch_cache starts from empty caches: use merge_caches to batch caches that hold tokens")
    return [BatchCache(layer, padding) for layer in cache]


def merge_caches(caches: list[list[Cache]]) -> list[BatchCache]:
    """Several models' worth of caches (single sequences or batches) as one batch, layer by layer."""
    return [BatchCache.merge(list(layers)) for layers in zip(*caches)]


def extract_cache(cache: list[BatchCache], row: int) -> list[KVCache]:
    """Row `row` of a batch as a single sequence's caches."""
    return [layer.extract(row) for layer in cache]


def filter_cache(cache: list[BatchCache], rows: list[int]) -> list[BatchCache]:
    """A batch of only `rows`."""
    return [layer.filter(rows) for layer in cache]


def writable_cache_path(path: str | Path, what: str = "prompt cache file") -> Path:
    """`path` when a prompt cache file can be written there (its folder exists), else one clear error naming
    `what` (a flag, say)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise Gemma3Error(f"cannot write {what} {path}: it is a folder: give a file path inside it")
    if not path.parent.is_dir():
        raise Gemma3Error(
            f"cannot write {what} {path}: the folder {path.parent} does not exist: create it or choose another path"
        )
    return path


def save_prompt_cache(path: str | Path, cache: list[Cache], token_ids: list[int], extra: dict | None = None) -> None:
    """Write every layer's state plus the token history to one safetensors file (atomically)."""
    path = writable_cache_path(path)
    arrays = {"token_ids": mx.array(list(token_ids) or [0], dtype=mx.int32)}
    layers = []
    for i, layer in enumerate(cache):
        arrays.update({f"layers.{i}.{j}": part for j, part in enumerate(layer.state)})
        layers.append({"class": type(layer).__name__, "meta": layer.meta_state})
    meta = {"format": PROMPT_CACHE_FORMAT, "tokens": str(len(token_ids)), "layers": json.dumps(layers)}
    meta["extra"] = json.dumps(extra or {})
    partial = path.with_name(f".{path.name}.partial.safetensors")
    try:
        mx.save_safetensors(str(partial), arrays, metadata=meta)
        os.replace(partial, path)
    except (RuntimeError, OSError) as e:  # MLX says only "Failed to open file" (no permission, disk full, ...)
        raise Gemma3Error(f"cannot write prompt cache file {path}: {getattr(e, 'strerror', None) or e}") from None
    finally:
        partial.unlink(missing_ok=True)


def load_prompt_cache(path: str | Path) -> tuple[list[Cache], list[int], dict]:
    """Read a file written by save_prompt_cache: (cache, token ids, extra)."""
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # MLX raises several types for a missing or damaged file
        raise Gemma3Error(f"cannot read prompt cache {path}: {e}") from None
    if meta.get("format") in OLD_PROMPT_CACHE_FORMATS:
        raise Gemma3Error(f"{path} was written by an older mlx_gemma3 ({meta['format']}): prefill the prompt again")
    if meta.get("format") != PROMPT_CACHE_FORMAT:
        raise Gemma3Error(f"{path} is not a prompt cache written by mlx_gemma3 (format {meta.get('format')!r})")
    try:
        cache = [restored_layer(arrays, i, record) for i, record in enumerate(json.loads(meta["layers"]))]
    except (KeyError, TypeError, ValueError) as e:
        raise Gemma3Error(f"prompt cache {path} is damaged: {e!r}") from None
    token_ids = arrays["token_ids"].tolist()[: int(meta["tokens"])]
    return cache, token_ids, json.loads(meta.get("extra", "{}"))


def restored_layer(arrays: dict[str, mx.array], i: int, record: dict) -> Cache:
    state = []
    while f"layers.{i}.{len(state)}" in arrays:
        state.append(arrays[f"layers.{i}.{len(state)}"])
    return cache_class(record["class"]).from_state(tuple(state), record["meta"])
