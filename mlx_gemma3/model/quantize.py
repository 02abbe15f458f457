"""Which layers are quantized and how: the converter's recipes, and the module swap `load` does from config.json.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import Gemma3Error

BITS = (4, 8)  # weight bit widths
GROUP_SIZES = (32, 64, 128)  # values per scale and bias
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 64
KV_BITS = BITS  # the KV cache quantizes with the same mx.quantize widths and groups
RECIPES = ("uniform", "mixed")
# The "mixed" recipe keeps these at 8 bits: the embedding (also the output head) and the layers whose
# errors reach the residual stream unnormalised.
EIGHT_BIT_IN_MIXED = ("embed_tokens", "lm_head", "self_attn.v_proj", "mlp.down_proj")
# Read as a table, not multiplied: stays float.
NEVER_QUANTIZED = ("position_embedding",)


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int


def parameter_count(model: nn.Module) -> int:
    """The weights a model holds, counted as its checkpoint counts them (transformers' num_parameters): a
    quantized layer's weight by the values it packs, its scales and biases not at all."""
    packed = {
        path: module.bits
        for path, module in model.named_modules()
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    count = 0
    for key, value in tree_flatten(model.parameters()):
        layer, _, name = key.rpartition(".")
        if layer in packed and name in ("scales", "biases"):
            continue
        count += value.size * 32 // packed[layer] if layer in packed and name == "weight" else value.size
    return count


def quantization_plan(model: nn.Module, recipe: str, bits: int, group_size: int) -> dict[str, QuantSpec | None]:
    """Module path → how it is quantized, or None for a layer kept in float (its input width is not a
    multiple of the group size), for every linear and embedding layer."""
    if recipe not in RECIPES:
        raise Gemma3Error(f"unknown quantization recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    if bits not in BITS or group_size not in GROUP_SIZES:
        raise Gemma3Error(
            f"quantization needs bits in {BITS} and a group size in {GROUP_SIZES}, got {bits}/{group_size}"
        )
    plan = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or path.endswith(NEVER_QUANTIZED):
            continue
        layer_bits = 8 if recipe == "mixed" and path.endswith(EIGHT_BIT_IN_MIXED) else bits
        fits = module.weight.shape[-1] % group_size == 0
        plan[path] = QuantSpec(layer_bits, group_size) if fits else None
    if not any(plan.values()):
        raise Gemma3Error(f"group size {group_size} divides no layer's input width: choose a smaller --q-group-size")
    return plan


def quantization_json(plan: dict[str, QuantSpec | None], bits: int, group_size: int) -> dict:
    """config.json's `quantization` block as mlx-lm writes it: defaults, then per-layer exceptions."""
    block: dict = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for path, spec in sorted(plan.items()):
        if spec is None:
            block[path] = False
        elif spec != QuantSpec(bits, group_size):
            block[path] = {"group_size": spec.group_size, "bits": spec.bits}
    return block


def apply_quantization(model: nn.Module, quantization: dict | None, weight_keys, where: str) -> None:
    """Swap in quantized layers for every layer whose weights are stored quantized (a `.scales` tensor)."""
    stored = {key.removesuffix(".scales") for key in weight_keys if key.endswith(".scales")}
    if not stored:
        return
    if not isinstance(quantization, dict):
        raise Gemma3Error(f"{where}: the weights are quantized but config.json has no 'quantization' block")
    group_size, bits, mode = (
        quantization.get("group_size"),
        quantization.get("bits"),
        quantization.get("mode", "affine"),
    )
    if not isinstance(group_size, int) or not isinstance(bits, int):
        raise Gemma3Error(f"{where}: config.json 'quantization' needs integer 'group_size' and 'bits'")

    def predicate(path: str, module: nn.Module):
        if path not in stored or not hasattr(module, "to_quantized"):
            return False
        override = quantization.get(path)
        if isinstance(override, dict):
            return {
                "group_size": override.get("group_size", group_size),
                "bits": override.get("bits", bits),
                "mode": override.get("mode", mode),
            }
        return True

    try:
        nn.quantize(model, group_size, bits, mode=mode, class_predicate=predicate)
    except ValueError as e:
        raise Gemma3Error(f"{where}: cannot rebuild the quantized layers ({e})") from None
