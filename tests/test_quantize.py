"""Quantized conversion: every bits × group × recipe is exact against transformers running the dequantized weights."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import TINY_IMAGE_TOKENS, TINY_TEXT, convert, random_ids, randomize, reference_logits
from mlx.utils import tree_flatten

import mlx_gemma3
from mlx_gemma3.convert.hf import map_key
from mlx_gemma3.model.weights import build_model, read_weights

WIDE_TEXT = {**TINY_TEXT, "hidden_size": 128, "intermediate_size": 256, "head_dim": 32, "query_pre_attn_scalar": 32}
# fc2's input (96) divides by 32 only, as the real 4304-wide vision MLP divides by none of 32/64/128.
WIDE_VISION = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14
)
CONFIGS = [(bits, group, recipe) for bits in (4, 8) for group in (32, 64, 128) for recipe in ("uniform", "mixed")]


def text_model():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return randomize(Gemma3ForCausalLM(Gemma3TextConfig(**WIDE_TEXT)), seed=7)


def multimodal_model():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(text_config=WIDE_TEXT, vision_config=WIDE_VISION, mm_tokens_per_image=4, **TINY_IMAGE_TOKENS)
    return randomize(Gemma3ForConditionalGeneration(config), seed=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant")
    models = {"text": text_model(), "vision": multimodal_model()}
    for name, model in models.items():
        model.save_pretrained(folder / name)
    return folder, models


def dequantized_reference(hf_model, mlx_dir):
    """A copy of the transformers model whose weights are our stored (quantized) weights, dequantized."""
    import copy

    config = mlx_gemma3.load(mlx_dir)[0].config
    stored = read_weights(mlx_dir)
    quantization = json.loads((mlx_dir / "config.json").read_text())["quantization"]
    reference = copy.deepcopy(hf_model)
    state = reference.state_dict()
    for hf_key in state:
        ours = map_key(hf_key, config)
        if ours is None:
            continue
        path = ours.removesuffix(".weight")
        if f"{path}.scales" in stored:
            spec = quantization.get(path) if isinstance(quantization.get(path), dict) else quantization
            value = mx.dequantize(
                stored[ours],
                stored[f"{path}.scales"],
                stored[f"{path}.biases"],
                group_size=spec["group_size"],
                bits=spec["bits"],
            )
        else:
            value = stored[ours]
        if ours == "vision_tower.vision_model.embeddings.patch_embedding.weight":
            value = value.transpose(0, 3, 1, 2)
        state[hf_key] = torch.tensor(np.array(value.astype(mx.float32)))
    reference.load_state_dict(state)
    return reference.eval()


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


@pytest.mark.parametrize("bits,group,recipe", CONFIGS)
@pytest.mark.parametrize("kind", ["text", "vision"])
def test_quantized_model_equals_its_dequantized_reference(saved, tmp_path, kind, bits, group, recipe):
    folder, models = saved
    args = ("-q", "--q-bits", str(bits), "--q-group-size", str(group), "--quant-recipe", recipe)
    mlx_dir = convert(folder / kind, tmp_path / "mlx", *args)
    model, _ = mlx_gemma3.load(mlx_dir)
    reference = dequantized_reference(models[kind], mlx_dir)
    ids = random_ids(3 * TINY_TEXT["sliding_window"])
    if kind == "text":
        ours = np.array(model(mx.array(ids)))
        expected, unquantized = reference_logits(reference, ids), reference_logits(models[kind], ids)
    else:
        ids[0, 5:11] = [
            TINY_IMAGE_TOKENS["boi_token_index"],
            *[TINY_IMAGE_TOKENS["image_token_index"]] * 4,
            TINY_IMAGE_TOKENS["eoi_token_index"],
        ]
        pixels = np.random.RandomState(0).uniform(-1, 1, (1, 56, 56, 3)).astype(np.float32)
        ours = np.array(model(mx.array(ids), pixel_values=mx.array(pixels)))
        expected, unquantized = (vision_logits(m, ids, pixels) for m in (reference, models[kind]))
    assert np.abs(ours - expected).max() <= (1e-4 if kind == "text" else 2e-4)  # vision: see test_vision.TOLERANCE
    distance = np.abs(ours - unquantized).max() / np.abs(unquantized).max()
    print(f"{kind} {bits}-bit group {group} {recipe}: max |Δ| to the unquantized model = {distance:.2%} of max |logit|")
    stored = quantized_paths(mlx_dir)
    assert stored and all("position_embedding" not in p for p in stored)
    if group != 32 and kind == "vision":
        assert not any(p.endswith("mlp.fc2") and "vision" in p for p in stored)  # 96 wide: stays float


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
    folder, _ = saved
    args = ("-q", "--q-bits", str(bits), "--q-group-size", str(group), "--quant-recipe", recipe)
    mlx_dir = convert(folder / "text", tmp_path / "mlx", *args)
    reported = float(capsys.readouterr().err.split(" bits per weight")[0].split()[-1])
    assert reported == pytest.approx(expected_bits_per_weight(mlx_dir), abs=0.01)
    print(f"{bits}-bit group {group} {recipe}: {reported:.2f} bits per weight")


def test_mixed_recipe_layers(saved, tmp_path):
    folder, _ = saved
    mlx_dir = convert(folder / "text", tmp_path / "mlx", "-q", "--quant-recipe", "mixed")
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

    folder, _ = saved
    result = run_cli(
        "mlx_gemma3.convert", "--hf-path", str(folder / "text"), "--mlx-path", str(tmp_path / "mlx"), *args
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
