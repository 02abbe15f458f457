"""Quantized conversion: every bits × group × recipe stores what the reference quantizer stores (mlx-lm's
`convert -q` of the same checkpoint), runs exactly like transformers on those weights, and lies no farther from the
float model than the reference does."""

from __future__ import annotations

import copy
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import TINY_IMAGE_TOKENS, TINY_TEXT, convert, edit_config, random_ids, reference_logits
from mlx.utils import tree_flatten

import mlx_gemma3
from mlx_gemma3.convert.hf import map_key
from mlx_gemma3.model.config import load_config
from mlx_gemma3.model.weights import build_model, read_weights

WIDE_TEXT = dict(hidden_size=128, intermediate_size=256, head_dim=32, query_pre_attn_scalar=32)  # over TINY_TEXT
# fc2's input (96) divides by 32 only, as the real 4304-wide vision MLP divides by none of 32/64/128.
WIDE_VISION = dict(hidden_size=64, intermediate_size=96)  # over TINY_VISION
CONFIGS = [(bits, group, recipe) for bits in (4, 8) for group in (32, 64, 128) for recipe in ("uniform", "mixed")]
# The "mixed" recipe as the converter's help states it: embedding/head, attention V and MLP down at 8 bits.
EIGHT_BIT_IN_MIXED = ("embed_tokens", "lm_head", "self_attn.v_proj", "mlp.down_proj")
FORWARD_TOLERANCE = {"text": 1e-4, "vision": 2e-4}  # vision: see test_vision.TOLERANCE


@pytest.fixture(scope="module")
def saved(converted_tiny):
    """The transformers checkpoints (with the tiny tokenizer mlx-lm's convert loads): kind → Tiny."""
    return {
        "text": converted_tiny(WIDE_TEXT, seed=7, tokenizer=True),
        "vision": converted_tiny(WIDE_TEXT, seed=8, vision=WIDE_VISION, image_tokens=TINY_IMAGE_TOKENS, tokenizer=True),
    }


def layer_bits(path: str, bits: int, recipe: str) -> int:
    return 8 if recipe == "mixed" and path.endswith(EIGHT_BIT_IN_MIXED) else bits


def reference_quantized(tiny, work, bits: int, group: int, recipe: str) -> dict[str, mx.array]:
    """The tensors the reference quantizer stores, by our key: mlx-lm's convert of the checkpoint for the language
    model; for the vision tower, which mlx-lm leaves out, quantized_by_mlx."""
    from mlx_lm import convert as mlx_lm_convert

    def predicate(path, module):
        return {"group_size": group, "bits": layer_bits(path, bits, recipe)}

    checkpoint = shutil.copytree(tiny.hf, work / "hf")
    if "text_config" in json.loads((checkpoint / "config.json").read_text()):
        # mlx-lm's gemma3 reads the vocabulary size at the top level only (default 262208, the real models')
        edit_config(checkpoint, lambda c: c.update(vocab_size=c["text_config"]["vocab_size"]))
    mlx_lm_convert(
        str(checkpoint),
        str(work / "mlx"),
        quantize=True,
        q_group_size=group,
        q_bits=bits,
        dtype="float32",
        quant_predicate=predicate,
    )
    tensors = dict(mx.load(str(work / "mlx" / "model.safetensors")))
    vision = lambda name: "vision_tower" in name and "position_embedding" not in name  # noqa: E731
    bits_of = lambda path: layer_bits(path, bits, recipe)  # noqa: E731
    return {**tensors, **quantized_by_mlx(tiny.reference, tiny.hf, group, bits_of, vision)}


def quantized_by_mlx(hf_model, hf_dir, group: int, bits_of, include) -> dict[str, mx.array]:
    """By our key, mx.quantize of each transformers Linear and Embedding weight that include(module name) selects
    and whose input width divides the group: what mlx-lm's quantize_model stores (nn.quantize's rule) for layers
    of models that mlx-lm cannot load. bits_of(our module path) → bits."""
    config = load_config(hf_dir)
    tensors = {}
    for name, module in hf_model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or not include(name):
            continue
        ours = map_key(f"{name}.weight", config)
        if ours is None or module.weight.shape[-1] % group:
            continue
        path = ours.removesuffix(".weight")
        parts = mx.quantize(mx.array(module.weight.detach().numpy()), group, bits_of(path))
        tensors.update(zip((f"{path}.weight", f"{path}.scales", f"{path}.biases"), parts))
    return tensors


def dequantized_reference(hf_model, hf_dir, tensors: dict[str, mx.array], spec):
    """A copy of the transformers model holding `tensors` (our keys), the quantized ones dequantized;
    spec(path) → (group size, bits)."""
    config = load_config(hf_dir)
    reference = copy.deepcopy(hf_model)
    state = reference.state_dict()
    for hf_key in state:
        ours = map_key(hf_key, config)
        if ours is None or ours not in tensors:
            continue
        path = ours.removesuffix(".weight")
        value = tensors[ours]
        if f"{path}.scales" in tensors:
            group, bits = spec(path)
            value = mx.dequantize(value, tensors[f"{path}.scales"], tensors[f"{path}.biases"], group, bits)
        if ours == "vision_tower.vision_model.embeddings.patch_embedding.weight":
            value = value.transpose(0, 3, 1, 2)
        state[hf_key] = torch.tensor(np.array(value.astype(mx.float32)))
    reference.load_state_dict(state)
    return reference.eval()


def assert_stores_the_references_tensors(mlx_dir, reference: dict[str, mx.array]) -> set[str]:
    """The folder quantizes the layers the reference quantizes, to the same weights, scales and biases (bit for bit);
    returns those layers' paths."""
    stored = read_weights(mlx_dir)
    quantized = {k.removesuffix(".scales") for k in stored if k.endswith(".scales")}
    assert quantized == {k.removesuffix(".scales") for k in reference if k.endswith(".scales")}
    for key in (f"{path}.{part}" for path in sorted(quantized) for part in ("weight", "scales", "biases")):
        assert stored[key].dtype == reference[key].dtype and mx.array_equal(stored[key], reference[key]), key
    return quantized


def expected_bits_per_weight(mlx_dir) -> float:
    """From config.json's quantization block and the float model's shapes (float32 scales and biases)."""
    config = mlx_gemma3.load(mlx_dir)[0].config
    quantization = json.loads((mlx_dir / "config.json").read_text())["quantization"]
    model = build_model(config)
    bits = total = 0
    for key, value in tree_flatten(model.parameters()):
        path = key.removesuffix(".weight")
        spec = quantization.get(path, quantization) if key.endswith(".weight") else None
        quantized = isinstance(spec, dict) and path in quantized_paths(mlx_dir)
        bits += value.size * (spec["bits"] + 2 * 32 / spec["group_size"] if quantized else 32)
        total += value.size
    return bits / total


def quantized_paths(mlx_dir) -> set[str]:
    return {k.removesuffix(".scales") for k in read_weights(mlx_dir) if k.endswith(".scales")}


def logits(model, kind: str, ids, pixels) -> np.ndarray:
    if kind == "text":
        return reference_logits(model, ids)
    return vision_logits(model, ids, pixels)


@pytest.mark.parametrize("bits,group,recipe", CONFIGS)
@pytest.mark.parametrize("kind", ["text", "vision"])
def test_quantized_conversion_equals_the_reference_quantizer(saved, tmp_path, kind, bits, group, recipe):
    """Our stored tensors are mlx-lm's; our logits are transformers' on them (dequantized); and our distance to the
    float model is the reference quantizer's distance, not more."""
    tiny = saved[kind]
    args = ("-q", "--q-bits", str(bits), "--q-group-size", str(group), "--quant-recipe", recipe)
    mlx_dir = convert(tiny.hf, tmp_path / "mlx", *args)
    reference = reference_quantized(tiny, tmp_path / "mlx-lm", bits, group, recipe)
    quantized = assert_stores_the_references_tensors(mlx_dir, reference)
    assert all("position_embedding" not in p for p in quantized)
    if group != 32 and kind == "vision":
        assert not any(p.endswith("mlp.fc2") and "vision" in p for p in quantized)  # 96 wide: stays float

    ids = random_ids(3 * TINY_TEXT["sliding_window"])
    pixels = np.random.RandomState(0).uniform(-1, 1, (1, 56, 56, 3)).astype(np.float32)
    if kind == "vision":
        ids[0, 5:11] = [
            TINY_IMAGE_TOKENS["boi_token_index"],
            *[TINY_IMAGE_TOKENS["image_token_index"]] * 4,
            TINY_IMAGE_TOKENS["eoi_token_index"],
        ]
    model, _ = mlx_gemma3.load(mlx_dir)
    images = {"pixel_values": mx.array(pixels)} if kind == "vision" else {}
    ours = np.array(model(mx.array(ids), **images))
    spec = lambda path: (group, layer_bits(path, bits, recipe))  # noqa: E731
    expected = logits(dequantized_reference(tiny.reference, tiny.hf, reference, spec), kind, ids, pixels)
    assert np.abs(ours - expected).max() <= FORWARD_TOLERANCE[kind]
    unquantized = logits(tiny.reference, kind, ids, pixels)
    theirs, mine = (np.abs(x - unquantized).max() for x in (expected, ours))
    print(f"{kind} {bits}-bit group {group} {recipe}: max |Δ| to float: reference {theirs:.4f}, ours {mine:.4f}")
    assert 0 < mine <= theirs + FORWARD_TOLERANCE[kind]


def vision_logits(model, ids, pixels):
    token_types = torch.tensor((ids == TINY_IMAGE_TOKENS["image_token_index"]).astype(np.int64))
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
            token_type_ids=token_types,
        )
    return out.logits.float().numpy()


@pytest.mark.parametrize("bits,group,recipe", [(4, 64, "uniform"), (8, 32, "uniform"), (4, 64, "mixed")])
def test_bits_per_weight_is_reported_and_as_expected(saved, tmp_path, capsys, bits, group, recipe):
    args = ("-q", "--q-bits", str(bits), "--q-group-size", str(group), "--quant-recipe", recipe)
    mlx_dir = convert(saved["text"].hf, tmp_path / "mlx", *args)
    reported = float(capsys.readouterr().err.split(" bits per weight")[0].split()[-1])
    assert reported == pytest.approx(expected_bits_per_weight(mlx_dir), abs=0.01)
    print(f"{bits}-bit group {group} {recipe}: {reported:.2f} bits per weight")


def test_mixed_recipe_layers(saved, tmp_path):
    mlx_dir = convert(saved["text"].hf, tmp_path / "mlx", "-q", "--quant-recipe", "mixed")
    block = json.loads((mlx_dir / "config.json").read_text())["quantization"]
    eight = {p for p, v in block.items() if isinstance(v, dict) and v["bits"] == 8}
    assert "model.embed_tokens" in eight and "model.layers.0.self_attn.v_proj" in eight
    assert "model.layers.0.mlp.down_proj" in eight and "model.layers.0.self_attn.q_proj" not in eight
    assert block["bits"] == 4 and block["group_size"] == 64
    assert "lm_head.weight" not in read_weights(mlx_dir)  # the tied head is the quantized embedding


@pytest.mark.parametrize(
    "args,bits,group",
    [
        ((), None, None),
        (("--q-bits", "8"), 8, 64),
        (("--q-group-size", "32"), 4, 32),
        (("--quant-recipe", "mixed"), 4, 64),
    ],
)
def test_quantization_options_imply_q(saved, tmp_path, args, bits, group):
    from conftest import run_cli

    result = run_cli(
        "mlx_gemma3.convert", "--hf-path", str(saved["text"].hf), "--mlx-path", str(tmp_path / "mlx"), *args
    )
    assert result.returncode == 0, result.stderr
    block = json.loads((tmp_path / "mlx" / "config.json").read_text()).get("quantization")
    if bits is None:
        assert block is None and not quantized_paths(tmp_path / "mlx")
        return
    assert (block["bits"], block["group_size"]) == (
        bits,
        group,
    ) and "model.layers.0.self_attn.q_proj" in quantized_paths(tmp_path / "mlx")
    assert (block.get("model.embed_tokens") == {"group_size": 64, "bits": 8}) == ("mixed" in args)
