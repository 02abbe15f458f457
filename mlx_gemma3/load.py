"""load(path) → (model, processor) from an MLX Gemma 3 folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig, load_config
from .errors import Gemma3Error
from .model import Gemma3
from .prompt import find_chat_template
from .quantize import apply_quantization
from .text import Gemma3TextLM
from .tokenizer import Tokenizer

FLOAT_TYPES = (mx.float32, mx.float16, mx.bfloat16)
TIED_HEAD_KEYS = ("lm_head.", "language_model.lm_head.")
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")


@dataclass
class Processor:
    """What turns user input into model input: the tokenizer (None when the folder has none) and chat template."""

    tokenizer: Tokenizer | None
    config: ModelConfig
    chat_template: str | None = None


def default_compute_dtype() -> mx.Dtype:
    """float32 on the CPU (MLX's CPU kernels are slow in half precision), bfloat16 on a GPU."""
    return mx.float32 if mx.default_device().type == mx.DeviceType.cpu else mx.bfloat16


def load(path: str | Path, compute_dtype: mx.Dtype | None = None):
    """Load an MLX Gemma 3 folder; returns (model, processor)."""
    folder = Path(path)
    if not folder.is_dir():
        raise Gemma3Error(f"model folder {folder} does not exist: pass a folder written by mlx_gemma3.convert")
    config = load_config(folder)
    model = build_model(config)
    dtype = compute_dtype or default_compute_dtype()
    weights = model_weights(folder, config, dtype)
    quantization = config.raw.get("quantization", config.raw.get("quantization_config"))
    apply_quantization(model, quantization, weights, where=str(folder))
    check_weights(model, weights, where=str(folder))
    if config.is_multimodal:  # the vision tower is read from disk when the first image comes
        weights = {k: v for k, v in weights.items() if not k.startswith(VISION_PREFIXES)}
        model.defer_vision(lambda: {k: v for k, v in model_weights(folder, config, dtype).items() if k.startswith(VISION_PREFIXES)})
    model.load_weights(list(weights.items()), strict=not config.is_multimodal)
    mx.eval(model.language_model.parameters() if config.is_multimodal else model.parameters())
    return model, Processor(Tokenizer.from_folder(folder), config, find_chat_template(folder))


def model_weights(folder: Path, config: ModelConfig, dtype: mx.Dtype) -> dict[str, mx.array]:
    """The folder's tensors (not yet read: MLX loads lazily), floats in the compute dtype."""
    weights = read_weights(folder)
    if config.text.tie_word_embeddings:  # mlx-vlm stores a copy of the tied head: the embedding is the head
        weights = {k: v for k, v in weights.items() if not k.startswith(TIED_HEAD_KEYS)}
    return {k: v.astype(dtype) if v.dtype in FLOAT_TYPES else v for k, v in weights.items()}


def build_model(config: ModelConfig) -> nn.Module:
    return Gemma3(config) if config.is_multimodal else Gemma3TextLM(config)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the index's shards if there is one, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise Gemma3Error(f"{index} is not a valid safetensors index ({e})") from None
        files = [folder / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise Gemma3Error(f"{index} names missing shard(s) {', '.join(missing)}: re-download the model")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise Gemma3Error(f"no *.safetensors weights in {folder}")
    return files


def read_safetensors(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path), format="safetensors")
    except Exception as e:  # MLX raises several types for a damaged file
        raise Gemma3Error(f"cannot read {path}: {e} — the file is truncated or not safetensors") from None


def read_weights(folder: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for path in weight_files(folder):
        weights.update(read_safetensors(path))
    return weights


def check_weights(model: nn.Module, weights: dict[str, mx.array], where: str) -> None:
    check_shapes(model, {k: tuple(v.shape) for k, v in weights.items()}, where)


def check_shapes(model: nn.Module, found: dict[str, tuple[int, ...]], where: str, source=None) -> None:
    """One clear error for a missing, unexpected or mis-shaped tensor; `source` names keys as the user knows them."""
    source = source or {}
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise Gemma3Error(f"{where}: missing tensor {missing[0]}" + _more(missing))
    unexpected = sorted(source.get(k, k) for k in set(found) - set(expected))
    if unexpected:
        raise Gemma3Error(f"{where}: unexpected tensor {unexpected[0]}" + _more(unexpected))
    for key, shape in expected.items():
        if found[key] != shape:
            raise Gemma3Error(f"{where}: tensor {source.get(key, key)} has shape {found[key]}, expected {shape}")


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
