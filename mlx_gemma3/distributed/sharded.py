"""load(path, distributed=...): each rank builds the whole model lazily, keeps its share and reads only that.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import Gemma3Error
from ..model.config import ModelConfig
from ..model.device import on_cpu
from ..model.quantize import apply_quantization
from ..model.weights import VISION_PREFIXES, build_model, check_weights, in_column_major, model_weights, vision_weights
from .group import LOAD_TIMEOUT_S, barrier, connect
from .pipeline import TIED_HEAD_ONLY, join_pipeline, keep_stage_layers, module_bytes, stage_bounds, stage_keys
from .tensor import ShardedEmbedding, check_divisible, shard_layers


def load_sharded(folder: Path, config: ModelConfig, dtype: mx.Dtype, mode: str) -> nn.Module:
    """This rank's share of the model, evaluated (the vision tower when the first image comes); the group is
    joined first (a missing peer is an error)."""
    if not config.text.tie_word_embeddings:
        raise Gemma3Error(TIED_HEAD_ONLY)
    group = connect()
    model = build_model(config)
    weights = model_weights(folder, config, dtype)  # lazy: nothing is read until evaluated
    quantization = config.raw.get("quantization", config.raw.get("quantization_config"))
    apply_quantization(model, quantization, weights, where=str(folder))
    check_weights(model, weights, where=str(folder))
    if mode == "pipeline":
        held = load_stage(model, config, weights, dtype, group)
    else:
        held = load_shard(model, config, weights, dtype, group, quantization)
    del weights
    for arrays in held:
        mx.eval(arrays)
    barrier(group, LOAD_TIMEOUT_S, "loading their share of the weights")
    if config.is_multimodal and (mode == "tensor" or group.rank() == 0):
        model.defer_vision(lambda: vision_weights(model, folder, config, dtype))
    return model


def text_model(model: nn.Module, config: ModelConfig) -> tuple[nn.Module, str]:
    """The decoder (embedding, layers, norm) and its checkpoint prefix."""
    if config.is_multimodal:
        return model.language_model.model, "language_model.model."
    return model.model, "model."


def load_stage(model, config, weights: dict, dtype, group) -> list[list[mx.array]]:
    """Pipeline: keep this rank's layers, load only their tensors; returns them in groups to evaluate."""
    text, prefix = text_model(model, config)
    bounds = stage_bounds([module_bytes(layer) for layer in text.layers], module_bytes(text.embed_tokens), group.size())
    start, end = bounds[group.rank()]
    keep_stage_layers(text, start, end)
    names = stage_keys(weights, prefix, start, end, group.rank(), group.size())
    held = {new: weights[old] for old, new in names.items() if not old.startswith(VISION_PREFIXES)}
    held = in_cpu_layout(model, held, dtype)
    model.load_weights(list(held.items()), strict=False)
    join_pipeline(model, text, dtype, group)
    return [list(held.values())]


def load_shard(model, config, weights: dict, dtype, group, quantization) -> list[list[mx.array]]:
    """Tensor parallel: the whole text tower loaded lazily, its layers sliced; returns one group per layer."""
    check_divisible(config.text, group.size(), quantization)
    text, _ = text_model(model, config)
    text_weights = [(k, v) for k, v in weights.items() if not k.startswith(VISION_PREFIXES)]
    model.load_weights(text_weights, strict=False)
    shard_layers(text.layers, group)
    text.embed_tokens = ShardedEmbedding(text.embed_tokens, config.text.vocab_size, group)
    if on_cpu() and dtype == mx.float32:
        for module in [m for _, m in text.named_modules() if is_float_matrix(m)]:
            module.weight = in_column_major(module.weight, dtype)
    rest = [v for k, v in tree_flatten(text.parameters()) if not k.startswith("layers.")]
    return [rest] + [[v for _, v in tree_flatten(layer.parameters())] for layer in text.layers]


def is_float_matrix(module: nn.Module) -> bool:
    """A linear or embedding layer (sharded or not) whose weight is a float matrix, not packed integers."""
    weight = module.get("weight") if isinstance(module, dict) else None
    return (
        "scales" not in module
        and isinstance(weight, mx.array)
        and weight.ndim == 2
        and mx.issubdtype(weight.dtype, mx.floating)
        and not isinstance(module, (nn.Conv2d,))
        and type(module).__name__.endswith(("Linear", "Embedding"))
    )


def in_cpu_layout(model: nn.Module, weights: dict[str, mx.array], dtype) -> dict[str, mx.array]:
    """On the CPU in float32, linear and embedding matrices column-major (see model.weights.column_major_keys)."""
    if not on_cpu() or dtype != mx.float32:
        return weights
    matrices = {f"{path}.weight" for path, module in model.named_modules() if is_float_matrix(module)}
    return {k: in_column_major(v, dtype) if k in matrices else v for k, v in weights.items()}
