"""Writing an MLX folder safely: a temporary folder beside the target, sharded weights, rename at the end."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from mlx_gemma3.errors import Gemma3Error

MAX_SHARD_BYTES = 5 * 1024**3


@contextmanager
def output_folder(target: Path, force: bool):
    """Yield a fresh temporary folder; on success it replaces `target`, on any failure it is removed."""
    target = Path(target)
    if target.exists() and not force:
        raise Gemma3Error(f"output folder {target} already exists: choose another path or pass --force")
    if target.exists() and not target.is_dir():
        raise Gemma3Error(f"output path {target} is a file, not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield work
        _replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _replace(work: Path, target: Path) -> None:
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "folder")
        os.replace(work, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, target)


class ShardWriter:
    """Collects tensors and writes `model-0000k-of-0000n.safetensors` shards of at most `max_bytes`."""

    def __init__(self, folder: Path, max_bytes: int = MAX_SHARD_BYTES):
        self.folder = folder
        self.max_bytes = max_bytes
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, array: mx.array) -> None:
        if self.pending and self.pending_bytes + array.nbytes > self.max_bytes:
            self.flush()
        self.pending[key] = array
        self.pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.written):05d}.tmp.safetensors"
        mx.save_safetensors(str(path), self.pending, metadata={"format": "mlx"})
        self.written.append((path, sorted(self.pending)))
        self.pending, self.pending_bytes = {}, 0

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
