"""Which layers train and how: adapter configs, LoRA/DoRA surgery, adapter files (mlx-lm's layout) and fuse."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import Gemma3Error
from .layers import BASE_TYPES, DoRALinear, LoRALinear

__all__ = ["AdapterConfig", "prepare_for_training", "save_adapters"]

FINE_TUNE_TYPES = ("lora", "dora", "full")
# Every attention and MLP projection of a decoder layer (paths inside one layer, as mlx-lm's "keys").
DEFAULT_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
LAYER_CLASSES = {"lora": LoRALinear, "dora": DoRALinear}


@dataclass
class AdapterConfig:
    """What is trained: the kind, the last `num_layers` decoder layers (-1: all) and, for LoRA/DoRA, the rank,
    the scale (peft's alpha / rank), dropout and the layer paths."""

    fine_tune_type: str = "lora"
    num_layers: int = -1
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    keys: tuple[str, ...] = DEFAULT_KEYS

    def check(self) -> None:
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise Gemma3Error(
                f"unknown fine-tune type {self.fine_tune_type!r}: use one of {', '.join(FINE_TUNE_TYPES)}"
            )
        if self.rank < 1 or not 0 <= self.dropout < 1 or not isinstance(self.num_layers, int):
            raise Gemma3Error(f"LoRA needs rank ≥ 1 and 0 ≤ dropout < 1, got rank {self.rank}, dropout {self.dropout}")

    def as_json(self) -> dict:
        """adapter_config.json's fields that mlx-lm's load_adapters reads."""
        lora = {"rank": self.rank, "scale": self.scale, "dropout": self.dropout, "keys": list(self.keys)}
        return {"fine_tune_type": self.fine_tune_type, "num_layers": self.num_layers, "lora_parameters": lora}

    @classmethod
    def from_json(cls, raw: dict, where: str) -> AdapterConfig:
        try:
            lora = raw.get("lora_parameters") or {}
            config = cls(
                fine_tune_type=raw.get("fine_tune_type", "lora"),
                num_layers=int(raw.get("num_layers", -1)),
                rank=int(lora.get("rank", 8)),
                scale=float(lora.get("scale", 20.0)),
                dropout=float(lora.get("dropout", 0.0)),
                keys=tuple(lora.get("keys") or DEFAULT_KEYS),
            )
        except (AttributeError, TypeError, ValueError) as e:
            raise Gemma3Error(f"{where} is not a valid adapter config ({e})") from None
        config.check()
        return config


def chosen_layers(model: nn.Module, num_layers: int) -> list[nn.Module]:
    layers = model.layers
    if num_layers > len(layers):
        raise Gemma3Error(f"--num-layers {num_layers} is more than the model's {len(layers)} layers (-1: all)")
    return layers if num_layers < 0 else layers[len(layers) - num_layers :]


def add_adapters(model: nn.Module, config: AdapterConfig) -> None:
    """Swap the chosen projections of the chosen layers for LoRA/DoRA layers wrapping them (none for "full")."""
    config.check()
    if config.fine_tune_type == "full":
        return
    layer_class = LAYER_CLASSES[config.fine_tune_type]
    found = set()
    for layer in chosen_layers(model, config.num_layers):
        swaps = [
            (path, layer_class(module, config.rank, config.scale, config.dropout))
            for path, module in layer.named_modules()
            if path in config.keys and isinstance(module, BASE_TYPES)
        ]
        found.update(path for path, _ in swaps)
        layer.update_modules(tree_unflatten(swaps))
    missing = sorted(set(config.keys) - found)
    if missing:
        raise Gemma3Error(
            f"no linear layer {missing[0]!r} in the decoder layers: LoRA keys are paths such as {DEFAULT_KEYS[0]!r}"
        )


def prepare_for_training(model: nn.Module, config: AdapterConfig, train_projector: bool = True) -> None:
    """Freeze the model, add adapters, and unfreeze what trains: the adapters (LoRA/DoRA) or the chosen layers'
    weights (full; -1: the whole language model), and a multimodal model's projector. The vision tower stays
    frozen."""
    config.check()
    if config.fine_tune_type == "full" and any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        raise Gemma3Error(
            "full fine-tuning needs a float model; for a quantized model use --fine-tune-type lora (QLoRA)"
        )
    model.freeze()
    add_adapters(model, config)
    if config.fine_tune_type == "full":
        language_model = getattr(model, "language_model", model)
        targets = [language_model] if config.num_layers < 0 else chosen_layers(model, config.num_layers)
        for target in targets:
            target.unfreeze()
    if train_projector and hasattr(model, "multi_modal_projector"):
        model.multi_modal_projector.unfreeze()


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_atomically(path: Path, arrays: dict[str, mx.array], metadata: dict | None = None) -> None:
    partial = path.with_name(f".{path.name}.partial.safetensors")
    try:
        mx.save_safetensors(str(partial), arrays, metadata=metadata or {})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_json_atomically(path: Path, value: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=2))
    os.replace(partial, path)


def save_adapters(model: nn.Module, folder: Path, config_json: dict, file_name: str = ADAPTER_FILE) -> Path:
    """Write the trainable weights (adapters.safetensors) and adapter_config.json into `folder`, each atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomically(folder / CONFIG_FILE, config_json)
    save_atomically(folder / file_name, trainable_weights(model), {"format": "mlx"})
    return folder / file_name


def read_adapter_config(folder: Path) -> AdapterConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise Gemma3Error(f"no {CONFIG_FILE} in {folder}: --adapter-path is the folder `mlx_gemma3.lora` wrote")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise Gemma3Error(f"{path} is not valid JSON ({e})") from None
    return AdapterConfig.from_json(raw, str(path))


def load_adapter_weights(model: nn.Module, file: Path) -> None:
    """Read an adapter file into a model that already has its adapter layers; every tensor must fit one."""
    try:
        weights = mx.load(str(file), format="safetensors")
    except Exception as e:  # MLX raises several types for a missing or damaged file
        raise Gemma3Error(f"cannot read adapter weights {file}: {e}") from None
    expected = dict(tree_flatten(model.parameters()))
    for key, value in weights.items():
        if key not in expected:
            raise Gemma3Error(f"{file}: tensor {key} fits no parameter of this model (adapters for another model?)")
        if value.shape != expected[key].shape:
            raise Gemma3Error(
                f"{file}: tensor {key} has shape {tuple(value.shape)}, the model's is "
                f"{tuple(expected[key].shape)} (adapters for another model?)"
            )
    model.load_weights([(k, v.astype(expected[k].dtype)) for k, v in weights.items()], strict=False)


def apply_adapter_folder(model: nn.Module, folder: str | Path) -> AdapterConfig:
    """Add the adapters a folder describes (adapter_config.json) and load their weights (adapters.safetensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Gemma3Error(f"adapter path {folder} is not a folder: give the folder `mlx_gemma3.lora` wrote")
    config = read_adapter_config(folder)
    add_adapters(model, config)
    load_adapter_weights(model, folder / ADAPTER_FILE)
    mx.eval(model.parameters())
    return config


def fuse_adapters(model: nn.Module, dequantize: bool = False) -> None:
    """Replace every adapter layer by one ordinary layer with the adapted weight; `dequantize`: float layers
    even where the base was quantized (then every quantized layer is dequantized)."""
    fused = [
        (path, module.fuse(dequantize)) for path, module in model.named_modules() if isinstance(module, LoRALinear)
    ]
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        plain = [
            (path, dequantized(module))
            for path, module in model.named_modules()
            if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        ]
        model.update_modules(tree_unflatten(plain))


def dequantized(module: nn.Module) -> nn.Module:
    weight = mx.dequantize(
        module.weight, module.scales, module.biases, group_size=module.group_size, bits=module.bits, mode=module.mode
    )
    if isinstance(module, nn.QuantizedEmbedding):
        layer = nn.Embedding(*weight.shape)
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
        if "bias" in module:
            layer.bias = module.bias
    layer.weight = weight
    return layer
