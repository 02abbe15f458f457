"""GGUF files read strictly: every count, length, type and offset of the header, metadata and tensor table is checked
against the file before it is used, so a damaged file ends in one clear error (docs/formats.md §4).

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import hashlib
import math
import mmap
import re
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np

from mlx_gemma3.errors import Gemma3Error

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays deeper than this are refused rather than recursed into
# GGUF value types: numpy dtype of each scalar (bool is one byte), then the two compound types.
SCALARS = {
    0: np.dtype("<u1"),
    1: np.dtype("<i1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i2"),
    4: np.dtype("<u4"),
    5: np.dtype("<i4"),
    6: np.dtype("<f4"),
    7: np.dtype("?"),
    10: np.dtype("<u8"),
    11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
STRING, ARRAY = 8, 9
# The fewest bytes one array item of a compound type takes: a string's length; an array's type and count.
MIN_ITEM_BYTES = {STRING: 8, ARRAY: 12}
DAMAGED = "the file is damaged, truncated or not GGUF: download it again (check it with --verify SHA256)"


class GGUFTensor(NamedTuple):
    """One entry of the tensor table, its bytes known to lie inside the file."""

    name: str
    shape: tuple[int, ...]  # as GGUF lists it, innermost dimension first
    tensor_type: gguf.GGMLQuantizationType
    n_bytes: int
    data_offset: int  # from the start of the file


class GGUFFile(NamedTuple):
    path: Path
    size: int
    metadata: dict[str, Any]  # strings, numbers, bools, and lists of them
    tensors: list[GGUFTensor]


class _Cursor:
    """Reads little-endian GGUF values from a buffer, refusing any read past its end."""

    def __init__(self, data, where: str):
        self.data, self.where, self.pos = data, where, 0

    def fail(self, message: str) -> Gemma3Error:
        return Gemma3Error(f"{self.where}: {message} — {DAMAGED}")

    def take(self, count: int, what: str) -> bytes:
        if count > len(self.data) - self.pos:
            raise self.fail(f"{what} at byte {self.pos} needs {count} bytes but the file ends at {len(self.data)}")
        start, self.pos = self.pos, self.pos + count
        return self.data[start : self.pos]

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "little")

    def string(self, what: str) -> str:
        start = self.pos
        raw = self.take(self.uint(8, what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(
                f"{what} (string at byte {start}) is not UTF-8: byte {raw[e.start]:#04x} at {e.start}"
            ) from None

    def value(self, kind: int, what: str, depth: int = 0) -> Any:
        if kind in SCALARS:
            return np.frombuffer(self.take(SCALARS[kind].itemsize, what), SCALARS[kind])[0].item()
        if kind == STRING:
            return self.string(what)
        if kind == ARRAY:
            return self.array(what, depth)
        raise self.fail(f"{what} has value type {kind}, not a GGUF type (0-12)")

    def array(self, what: str, depth: int) -> list:
        if depth >= MAX_NESTING:
            raise self.fail(f"{what} nests arrays more than {MAX_NESTING} deep")
        kind, count = self.uint(4, f"{what}'s item type"), self.uint(8, f"{what}'s length")
        item_bytes = SCALARS[kind].itemsize if kind in SCALARS else MIN_ITEM_BYTES.get(kind)
        if item_bytes is None:
            raise self.fail(f"{what} holds items of type {kind}, not a GGUF type (0-12)")
        if count * item_bytes > len(self.data) - self.pos:
            raise self.fail(f"{what} claims {count} items, more than the {len(self.data) - self.pos} bytes left hold")
        if kind in SCALARS:
            return np.frombuffer(self.take(count * item_bytes, what), SCALARS[kind]).tolist()
        return [self.value(kind, f"{what}[{i}]", depth + 1) for i in range(count)]


def read_gguf(path: Path) -> GGUFFile:
    """The metadata and tensor table of a GGUF file, checked; tensor data stays on disk."""
    path = Path(path)
    if not path.is_file():
        raise Gemma3Error(f"GGUF file {path} does not exist")
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise Gemma3Error(f"{path} holds {size} bytes, too few for a GGUF header — {DAMAGED}")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(path, data, size)
    except OSError as e:
        raise Gemma3Error(f"cannot read GGUF file {path}: {e.strerror or e}") from None


def _parse(path: Path, data, size: int) -> GGUFFile:
    cursor = _Cursor(data, str(path))
    if cursor.take(4, "the magic") != MAGIC:
        raise cursor.fail("it does not start with 'GGUF'")
    version = cursor.uint(4, "the version")
    if version not in VERSIONS:
        raise cursor.fail(f"version {version} is not one this reader knows ({', '.join(map(str, VERSIONS))})")
    tensor_count, kv_count = cursor.uint(8, "the tensor count"), cursor.uint(8, "the metadata count")
    metadata = _metadata(cursor, kv_count)
    alignment = _alignment(cursor, metadata)
    entries = _tensor_entries(cursor, tensor_count)
    data_start = cursor.pos + (-cursor.pos) % alignment
    tensors = [_tensor(cursor, entry, data_start, alignment, size) for entry in entries]
    _check_no_overlap(cursor, tensors)
    return GGUFFile(path, size, metadata, tensors)


def _metadata(cursor: _Cursor, count: int) -> dict[str, Any]:
    if count * 12 > len(cursor.data) - cursor.pos:  # a key's length and a value's type at least
        raise cursor.fail(f"the header claims {count} metadata entries, more than the file holds")
    metadata = {}
    for i in range(count):
        key = cursor.string(f"metadata key {i}")
        if key in metadata:
            raise cursor.fail(f"metadata key {key!r} appears twice")
        metadata[key] = cursor.value(cursor.uint(4, f"{key}'s type"), key)
    return metadata


def _alignment(cursor: _Cursor, metadata: dict) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise cursor.fail(f"general.alignment is {alignment!r}, not a power of two")
    return alignment


class _Entry(NamedTuple):
    name: str
    shape: tuple[int, ...]
    kind: int
    offset: int


def _tensor_entries(cursor: _Cursor, count: int) -> list[_Entry]:
    if count * 28 > len(cursor.data) - cursor.pos:  # name length, dims count, one dim, type, offset at least
        raise cursor.fail(f"the header claims {count} tensors, more than the file holds")
    entries, names = [], set()
    for i in range(count):
        name = cursor.string(f"tensor {i}'s name")
        if name in names:
            raise cursor.fail(f"tensor {name!r} appears twice in the tensor table")
        names.add(name)
        dims = cursor.uint(4, f"tensor {name}'s dimension count")
        if not 1 <= dims <= MAX_DIMS:
            raise cursor.fail(f"tensor {name} has {dims} dimensions (GGML allows 1 to {MAX_DIMS})")
        shape = tuple(cursor.uint(8, f"tensor {name}'s shape") for _ in range(dims))
        entries.append(
            _Entry(name, shape, cursor.uint(4, f"tensor {name}'s type"), cursor.uint(8, f"tensor {name}'s offset"))
        )
    return entries


def _tensor(cursor: _Cursor, entry: _Entry, data_start: int, alignment: int, size: int) -> GGUFTensor:
    name = entry.name
    try:
        kind = gguf.GGMLQuantizationType(entry.kind)
    except ValueError:
        raise cursor.fail(f"tensor {name} has type {entry.kind}, not a GGML type") from None
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    if min(entry.shape) < 1 or entry.shape[0] % block_values:
        raise cursor.fail(f"tensor {name} has shape {entry.shape}, not whole {kind.name} blocks of {block_values}")
    n_bytes = math.prod(entry.shape) // block_values * block_bytes
    if entry.offset % alignment:
        raise cursor.fail(f"tensor {name}'s offset {entry.offset} is not a multiple of the alignment {alignment}")
    start = data_start + entry.offset
    if start + n_bytes > size:
        raise cursor.fail(f"tensor {name} ({n_bytes} bytes at {start}) lies past the end of the file ({size} bytes)")
    return GGUFTensor(name, entry.shape, kind, n_bytes, start)


def _check_no_overlap(cursor: _Cursor, tensors: list[GGUFTensor]) -> None:
    ordered = sorted(tensors, key=lambda t: t.data_offset)
    for before, after in zip(ordered, ordered[1:]):
        if before.data_offset + before.n_bytes > after.data_offset:
            raise cursor.fail(f"tensors {before.name} and {after.name} overlap in the file")


def check_sha256(path: Path, expected: str) -> None:
    """One clear error unless the file's SHA-256 is `expected` (64 hex digits): GGUF carries no checksum of its
    own, so a changed byte inside a vocabulary string or a weight is otherwise accepted."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", expected):
        raise Gemma3Error(f"--verify takes a SHA-256 as 64 hexadecimal digits, got {expected!r}")
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    except OSError as e:
        raise Gemma3Error(f"cannot read {path} to verify it: {e.strerror or e}") from None
    if digest.hexdigest() != expected.lower():
        raise Gemma3Error(
            f"{path} has SHA-256 {digest.hexdigest()}, not the {expected.lower()} given to --verify: "
            "the file is damaged or a different one — download it again"
        )
