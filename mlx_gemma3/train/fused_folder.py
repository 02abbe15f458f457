"""Fuse: a base folder plus its adapters written as one ordinary model folder (loads here and in mlx-lm / mlx-vlm).

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..model.config import load_config
from ..model.device import default_compute_dtype
from ..model.weights import load_model, read_weights
from .adapters import apply_adapter_folder, fuse_adapters, write_json_atomically

WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")


def fuse_folder(source: Path, adapter_path: Path, out: Path, dequantize: bool = False) -> None:
    """Write `out`: the fused weights (model.safetensors), and every other file of `source` copied, config.json
    without its quantization block when `dequantize`. Floats keep the dtype the base stored them in."""
    config = load_config(source)
    model = load_model(source, config, default_compute_dtype(), for_training=True)
    apply_adapter_folder(model, adapter_path)
    fuse_adapters(model, dequantize)
    weights = stored_dtypes(dict(tree_flatten(model.parameters())), read_weights(source))
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not any(path.match(pattern) for pattern in WEIGHT_FILES):
            shutil.copyfile(path, out / path.name)
    config = json.loads((source / "config.json").read_text())
    if dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    write_json_atomically(out / "config.json", config)
    partial = out / ".model.safetensors.partial.safetensors"
    mx.save_safetensors(str(partial), weights, metadata={"format": "mlx"})
    partial.replace(out / "model.safetensors")


def stored_dtypes(weights: dict[str, mx.array], stored: dict[str, mx.array]) -> dict[str, mx.array]:
    """Each float tensor cast to the float dtype its base stored (a dequantized layer: its scales' dtype)."""
    out = {}
    for key, value in weights.items():
        if not mx.issubdtype(value.dtype, mx.floating):
            out[key] = value
            continue
        base = stored.get(key)
        if base is None or not mx.issubdtype(base.dtype, mx.floating):
            base = stored.get(key.removesuffix(".weight") + ".scales", value)
        out[key] = value.astype(base.dtype)
    return out
