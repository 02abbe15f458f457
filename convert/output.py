"""Writing an MLX folder safely: a new folder beside the target, safetensors shards streamed to disk, rename at the end.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from mlx_gemma3.errors import Gemma3Error

MAX_SHARD_BYTES = 5 * 1024**3
COPY_BYTES = 16 * 1024**2  # buffer for copying a shard's data behind its header
SAFETENSORS_CODES = {
    mx.bool_: "BOOL",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.uint16: "U16",
    mx.int16: "I16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.uint64: "U64",
    mx.int64: "I64",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.float32: "F32",
    mx.float64: "F64",
}


@contextmanager
def output_folder(target: Path, force: bool):
    """Yield a fresh work folder; on success it replaces `target`, on any failure it is removed."""
    target = Path(target)
    if target.exists() and not force:
        raise Gemma3Error(f"output folder {target} already exists: choose another path or pass --force")
    if target.exists() and not target.is_dir():
        raise Gemma3Error(f"output path {target} is a file, not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = new_folder(target.parent, f".{target.name}.partial-")
    try:
        yield work
        _replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def new_folder(parent: Path, prefix: str) -> Path:
    """A new folder with a random name, made by mkdir so its mode respects the umask (tempfile.mkdtemp's is 0700)."""
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def _replace(work: Path, target: Path) -> None:
    if target.exists():
        old = new_folder(target.parent, f".{target.name}.old-")
        os.replace(target, old / "folder")
        os.replace(work, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, target)


class ShardWriter:
    """Writes tensors as they come into `model-0000k-of-0000n.safetensors` shards of at most `max_bytes`,
    holding none of them in memory."""

    def __init__(self, folder: Path, max_bytes: int = MAX_SHARD_BYTES):
        self.folder = folder
        self.max_bytes = max_bytes
        self.shard: Shard | None = None
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, array: mx.array) -> None:
        self.reserve(key, array.dtype, array.shape).write(0, array)

    def reserve(self, key: str, dtype: mx.Dtype, shape: tuple[int, ...]) -> Slot:
        """Room for a tensor that is then written in blocks of rows (`Slot.write`)."""
        nbytes = math.prod(shape) * dtype.size
        if self.shard is not None and self.shard.nbytes and self.shard.nbytes + nbytes > self.max_bytes:
            self.flush()
        if self.shard is None:
            self.shard = Shard(self.folder / f"shard-{len(self.written):05d}.tmp.safetensors")
        self.total_bytes += nbytes
        return self.shard.reserve(key, dtype, tuple(shape))

    def flush(self) -> None:
        """End the current shard: the next tensor starts a new one."""
        if self.shard is None:
            return
        self.written.append((self.shard.close(), sorted(self.shard.slots)))
        self.shard = None

    def close(self) -> list[Path]:
        """Name the shards and write the index (only when there is more than one shard)."""
        self.flush()
        count = len(self.written)
        if count == 1:
            final = self.folder / "model.safetensors"
            os.replace(self.written[0][0], final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, keys) in enumerate(self.written):
            final = self.folder / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(path, final)
            finals.append(final)
            weight_map.update({key: final.name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return finals


class Shard:
    """One safetensors file in the making: tensor data goes to `<path>.data` as it comes; closing writes the
    header (known only then) followed by that data."""

    def __init__(self, path: Path):
        self.path = path
        self.data_path = path.with_suffix(".data")
        self.data = open(self.data_path, "wb")
        self.slots: dict[str, Slot] = {}
        self.nbytes = 0

    def reserve(self, key: str, dtype: mx.Dtype, shape: tuple[int, ...]) -> Slot:
        slot = Slot(self.data, self.nbytes, dtype, shape)
        self.slots[key] = slot
        self.nbytes += slot.nbytes
        return slot

    def close(self) -> Path:
        unfilled = [key for key, slot in self.slots.items() if slot.filled != slot.nbytes]
        if unfilled:
            raise RuntimeError(f"converter bug: tensors reserved but not written: {', '.join(unfilled)}")
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "mlx"}, **{k: s.header() for k, s in self.slots.items()}})
        encoded = header.encode() + b" " * (-len(header.encode()) % 8)  # the format pads headers with spaces
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(encoded)) + encoded)
            shutil.copyfileobj(data, out, COPY_BYTES)
        self.data_path.unlink()
        return self.path


class Slot:
    """A tensor's bytes in a shard, written in blocks of leading rows."""

    def __init__(self, file, begin: int, dtype: mx.Dtype, shape: tuple[int, ...]):
        self.file, self.begin, self.dtype, self.shape = file, begin, dtype, shape
        self.row_bytes = math.prod(shape[1:]) * dtype.size
        self.nbytes = math.prod(shape) * dtype.size
        self.filled = 0

    def write(self, row: int, block: mx.array) -> None:
        """Rows `row`… of the tensor: `block` holds the tensor's dtype and trailing shape."""
        if block.dtype != self.dtype or block.shape[1:] != self.shape[1:] or row + block.shape[0] > self.shape[0]:
            raise RuntimeError(
                f"converter bug: block {block.dtype}{block.shape} at row {row} in {self.dtype}{self.shape}"
            )
        block = mx.contiguous(block)
        mx.eval(block)
        self.file.seek(self.begin + row * self.row_bytes)
        self.file.write(memoryview(block))
        self.filled += block.nbytes

    def header(self) -> dict:
        return {
            "dtype": SAFETENSORS_CODES[self.dtype],
            "shape": list(self.shape),
            "data_offsets": [self.begin, self.begin + self.nbytes],
        }
