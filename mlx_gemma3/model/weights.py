"""One MLX Gemma 3 folder's weights read into one process: build the model, read and check its tensors.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import Gemma3Error
from .config import ModelConfig
from .device import FLOAT_TYPES, on_cpu
from .embedding_model import Gemma3Embedding, SentenceConfig
from .gemma3 import Gemma3
from .quantize import apply_quantization
from .text import Gemma3TextLM

TIED_HEAD_KEYS = ("lm_head.", "language_model.lm_head.")
SHIELD_WRAPPER = "model."  # ShieldGemma2ForImageClassification holds its Gemma 3 as `model`
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")
EMBEDDING_ONLY = (
    "is an embedding model (EmbeddingGemma: bidirectional attention): it encodes texts into vectors and does not "
    "generate; use mlx_gemma3.load_embedding and mlx_gemma3.embed (or python -m mlx_gemma3.embed)"
)


def load_model(
    folder: Path, config: ModelConfig, dtype: mx.Dtype, lazy_vision: bool = True, for_training: bool = False
) -> nn.Module:
    """The whole model of an MLX folder in this process, evaluated. `lazy_vision`: a multimodal model reads its
    vision tower when the first image comes. `for_training`: both towers read now, every array row-major."""
    if config.is_embedding:
        raise Gemma3Error(f"{folder} {EMBEDDING_ONLY}")
    model = build_model(config)
    weights = quantized_weights(model, folder, config, dtype, for_training)
    defer = config.is_multimodal and lazy_vision and not for_training
    if defer:
        weights = {k: v for k, v in weights.items() if not k.startswith(VISION_PREFIXES)}
        model.defer_vision(lambda: vision_weights(model, folder, config, dtype))
    model.load_weights(list(weights.items()), strict=not defer)
    mx.eval(model.language_model.parameters() if defer else model.parameters())
    return model


def load_embedding_model(
    folder: Path, config: ModelConfig, sentence: SentenceConfig, dtype: mx.Dtype
) -> Gemma3Embedding:
    """EmbeddingGemma from an MLX folder (its keys `model.*` and `dense.{i}.*`), evaluated."""
    model = Gemma3Embedding(config, sentence)
    weights = quantized_weights(model, folder, config, dtype)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def quantized_weights(
    model: nn.Module, folder: Path, config: ModelConfig, dtype: mx.Dtype, for_training: bool = False
) -> dict[str, mx.array]:
    """The folder's tensors for `model`, whose layers stored quantized are swapped for quantized ones first;
    every tensor checked against the model's parameters."""
    column_major = set() if for_training else column_major_keys(model, dtype)
    weights = model_weights(folder, config, dtype, column_major)
    quantization = config.raw.get("quantization", config.raw.get("quantization_config"))
    apply_quantization(model, quantization, weights, where=str(folder))
    check_weights(model, weights, where=str(folder))
    return weights


def model_weights(
    folder: Path, config: ModelConfig, dtype: mx.Dtype, column_major: set[str] = frozenset()
) -> dict[str, mx.array]:
    """The folder's tensors (not yet read: MLX loads lazily), floats in the compute dtype; the float matrices
    named in `column_major` keep their shape and values but are laid out column-major."""
    weights = {unwrapped_key(k, config): v for k, v in read_weights(folder).items()}
    if config.text.tie_word_embeddings:  # mlx-vlm stores a copy of the tied head: the embedding is the head
        weights = {k: v for k, v in weights.items() if not k.startswith(TIED_HEAD_KEYS)}
    return {k: in_compute_dtype(v, dtype, k in column_major) for k, v in weights.items()}


def unwrapped_key(key: str, config: ModelConfig) -> str:
    """A ShieldGemma 2 key without the wrapper's `model.` prefixes: the Hub nests Gemma 3 once
    (`model.language_model.model.…`), transformers 5 twice (`model.model.language_model.model.…`)."""
    while config.is_shield and key.startswith(SHIELD_WRAPPER):
        key = key[len(SHIELD_WRAPPER) :]
    return key


def in_compute_dtype(w: mx.array, dtype: mx.Dtype, column_major: bool) -> mx.array:
    if w.dtype not in FLOAT_TYPES:
        return w
    if column_major:
        return in_column_major(w, dtype)
    return w.astype(dtype)


def in_column_major(w: mx.array, dtype: mx.Dtype, rows: int = 1024) -> mx.array:
    """w cast to `dtype`, same shape and values, stored column-major. Written a band of rows at a time: the
    copy stays in cache and never holds a second full-size temporary (4× faster on the 270M's head)."""
    out = mx.zeros((w.shape[1], w.shape[0]), dtype)
    for start in range(0, w.shape[0], rows):
        out[:, start : start + rows] = mx.contiguous(w[start : start + rows].T).astype(dtype)
    return out.T


def vision_weights(model: nn.Module, folder: Path, config: ModelConfig, dtype: mx.Dtype) -> dict[str, mx.array]:
    weights = model_weights(folder, config, dtype, column_major_keys(model, dtype))
    return {k: v for k, v in weights.items() if k.startswith(VISION_PREFIXES)}


def column_major_keys(model: nn.Module, dtype: mx.Dtype) -> set[str]:
    """The weights to hold column-major: on the CPU in float32, every linear and embedding matrix. `x @ w.T`
    then reaches the BLAS as a plain row-major product, which the CPU backend's BLAS runs about twice as fast
    as the transposed one (benchmarks/profile_step.py); Metal's kernels need no such help."""
    if not on_cpu() or dtype != mx.float32:
        return set()
    return {f"{path}.weight" for path, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Embedding))}


def build_model(config: ModelConfig) -> nn.Module:
    """The generating model a config describes (an EmbeddingGemma config describes none: see Gemma3Embedding)."""
    if config.is_embedding:
        raise Gemma3Error(f"this model {EMBEDDING_ONLY}")
    return Gemma3(config) if config.is_multimodal else Gemma3TextLM(config)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the index's shards if there is one, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise Gemma3Error(f"{index} is not a valid safetensors index ({e})") from None
        outside = [
            name for name in names if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")
        ]
        if outside:
            raise Gemma3Error(
                f"{index} names shard(s) outside its folder ({', '.join(map(repr, outside[:3]))}): a shard "
                "is a file name in the same folder; fix or re-download the index"
            )
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
