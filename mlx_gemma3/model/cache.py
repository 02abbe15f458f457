"""KV caches: a growing cache for full-attention layers, a rotating cache for sliding layers, optionally quantized."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx

from ..errors import Gemma3Error
from .quantize import KV_BITS

REWIND = 16  # tokens a sliding cache keeps beyond its window so trim() works after the ring has wrapped
STEP = 256  # full caches grow by this many slots at a time
PROMPT_CACHE_FORMAT = "mlx_gemma3.prompt_cache/1"


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

    def __init__(self, bits: int | None = None, group_size: int = 64):
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


class KVCache:
    """Full-attention layers: keeps every key and value in buffers preallocated STEP slots at a time."""

    kind = "full"
    window: int | None = None

    def __init__(self, bits: int | None = None, group_size: int = 64):
        self.store = KVStore(bits, group_size)
        self.keys = self.values = None
        self.offset = 0

    def held(self) -> int:
        """Keys attended to by the next query (the stored token count)."""
        return self.offset

    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    def key_positions(self, length: int) -> tuple[mx.array, mx.array | None]:
        """Positions of the keys the next update of `length` tokens returns, and which of them are valid."""
        return mx.arange(0, self.offset + length), None

    def make_mask(self, length: int, blocks: mx.array | None = None) -> mx.array | None:
        """The mask for the next update of `length` tokens (None when one query may see every key)."""
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
        """Forget the last n tokens (as many as possible); returns how many were forgotten."""
        n = min(n, self.trimmable())
        self.offset -= n
        return n

    def ordered(self) -> tuple[tuple[mx.array, ...], tuple[mx.array, ...]]:
        """Held keys and values (stored form) oldest first."""
        return sliced(self.keys, 0, self.offset), sliced(self.values, 0, self.offset)

    def restore(self, keys: tuple[mx.array, ...], values: tuple[mx.array, ...], offset: int) -> None:
        self.keys, self.values, self.offset = keys, values, offset

    def nbytes(self) -> int:
        return sum(b.nbytes for b in (*(self.keys or ()), *(self.values or ())))


class SlidingKVCache(KVCache):
    """Sliding-window layers: a ring of window − 1 + rewind slots; a chunk call sees at most W + chunk + rewind keys."""

    kind = "sliding"

    def __init__(self, window: int, rewind: int = REWIND, bits: int | None = None, group_size: int = 64):
        super().__init__(bits, group_size)
        self.window, self.rewind = window, rewind
        self.slots = window - 1 + rewind
        self.count = 0  # valid slots
        self.idx = 0  # next slot to write

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
                return self.store.decode(sliced(self.keys, 0, self.count)), self.store.decode(sliced(self.values, 0, self.count))
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


def in_order(idx: int, count: int, slots: int) -> bool:
    """Whether a ring's valid slots are 0…count−1, oldest first (it has not wrapped, or wrapped exactly)."""
    return (idx - count) % slots == 0


def make_cache(
    layers, window: int, kv_bits: int | None = None, kv_group_size: int = 64, max_kv_size: int | None = None
) -> list[KVCache]:
    """One cache per decoder layer: sliding layers get the rotating cache, full layers a growing one."""
    if max_kv_size is not None and max_kv_size < 1:
        raise Gemma3Error(f"max_kv_size must be a positive number of tokens, got {max_kv_size}")

    def cache_for(layer) -> KVCache:
        if layer.is_sliding:
            return SlidingKVCache(min(window, max_kv_size or window), bits=kv_bits, group_size=kv_group_size)
        if max_kv_size is not None:
            return SlidingKVCache(max_kv_size, bits=kv_bits, group_size=kv_group_size)
        return KVCache(bits=kv_bits, group_size=kv_group_size)

    return [cache_for(layer) for layer in layers]


def save_prompt_cache(path: str | Path, cache: list[KVCache], token_ids: list[int], extra: dict | None = None) -> None:
    """Write every layer's keys and values plus the token history to one safetensors file (atomically)."""
    arrays = {"token_ids": mx.array(list(token_ids) or [0], dtype=mx.int32)}
    layers = []
    for i, layer in enumerate(cache):
        keys, values = layer.ordered() if layer.keys is not None else ((), ())
        for name, parts in (("keys", keys), ("values", values)):
            arrays.update({f"layers.{i}.{name}.{j}": part for j, part in enumerate(parts)})
        layers.append(cache_description(layer))
    meta = {"format": PROMPT_CACHE_FORMAT, "tokens": str(len(token_ids)), "layers": json.dumps(layers)}
    meta["extra"] = json.dumps(extra or {})
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial.safetensors")
    try:
        mx.save_safetensors(str(partial), arrays, metadata=meta)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def cache_description(layer: KVCache) -> dict:
    described = {"kind": layer.kind, "offset": layer.offset, "bits": layer.store.bits}
    described["group_size"] = layer.store.group_size
    if isinstance(layer, SlidingKVCache):
        described.update(window=layer.window, rewind=layer.rewind)
    return described


def load_prompt_cache(path: str | Path) -> tuple[list[KVCache], list[int], dict]:
    """Read a file written by save_prompt_cache: (cache, token ids, extra)."""
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # MLX raises several types for a missing or damaged file
        raise Gemma3Error(f"cannot read prompt cache {path}: {e}") from None
    if meta.get("format") != PROMPT_CACHE_FORMAT:
        raise Gemma3Error(f"{path} is not a prompt cache written by mlx_gemma3 (format {meta.get('format')!r})")
    cache = [restored_layer(arrays, i, d) for i, d in enumerate(json.loads(meta["layers"]))]
    token_ids = arrays["token_ids"].tolist()[: int(meta["tokens"])]
    return cache, token_ids, json.loads(meta.get("extra", "{}"))


def restored_layer(arrays: dict[str, mx.array], i: int, described: dict) -> KVCache:
    if described["kind"] == "sliding":
        layer = SlidingKVCache(described["window"], described["rewind"], described["bits"], described["group_size"])
    else:
        layer = KVCache(described["bits"], described["group_size"])
    parts = 1 if described["bits"] is None else 3
    if f"layers.{i}.keys.0" in arrays:
        keys = tuple(arrays[f"layers.{i}.keys.{j}"] for j in range(parts))
        values = tuple(arrays[f"layers.{i}.values.{j}"] for j in range(parts))
        layer.restore(keys, values, described["offset"])
    return layer
