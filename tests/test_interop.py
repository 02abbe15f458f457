"""Interop: our folders load in mlx-lm / mlx-vlm, and theirs (mlx-community's layouts) load in mlx_gemma3."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import (
    TINY_IMAGE_TOKENS,
    TINY_TEXT,
    TINY_VISION,
    convert,
    our_logits,
    random_ids,
    randomize,
    reference_logits,
    tiny_multimodal_model,
    tiny_text_model,
)
from safetensors.torch import save_file

import mlx_gemma3

TOL = 1e-4
LINEAR_X8 = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}
TEXT_CASES = {
    "plain": {},
    "linear_rope_x8": dict(rope_parameters=LINEAR_X8),
    "query_scalar_not_head_dim": dict(query_pre_attn_scalar=24),
}
OUR_QUANT = {
    "4bit": ["-q"],
    "8bit_group32": ["-q", "--q-bits", "8", "--q-group-size", "32"],
    "mixed": ["-q", "--quant-recipe", "mixed"],
}
THEIR_QUANT = {"4bit": dict(q_bits=4, q_group_size=64), "8bit_group32": dict(q_bits=8, q_group_size=32)}
IDS = random_ids(40, vocab=500)  # longer than the sliding window (16), below the tiny image token ids
PIXELS = np.random.RandomState(1).uniform(-1, 1, size=(2, TINY_VISION["image_size"], TINY_VISION["image_size"], 3))
PIXELS = PIXELS.astype(np.float32)

needs_mlx_lm = pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None, reason="mlx-lm is not installed")


def assert_close(ours: np.ndarray, expected: np.ndarray, tol: float = TOL) -> None:
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= tol


def mlx_lm_logits(folder: Path) -> np.ndarray:
    import mlx_lm

    model, _ = mlx_lm.load(str(folder))
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def mlx_lm_convert(hf_dir: Path, out: Path, **quantize) -> Path:
    from mlx_lm import convert as lm_convert

    lm_convert(str(hf_dir), str(out), quantize=bool(quantize), **quantize)
    return out


@pytest.fixture(scope="module")
def text_models(converted_tiny):
    """Saved float32 tiny text models with a SentencePiece tokenizer, by case: name → (hf folder, model)."""

    def get(case: str):
        tiny = converted_tiny(TEXT_CASES[case], seed=11, tokenizer=True)
        return tiny.hf, tiny.reference

    return get


# --- our folders in mlx-lm -------------------------------------------------------------------------------------


@needs_mlx_lm
@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_our_float_folder_loads_in_mlx_lm(text_models, case, tmp_path):
    hf_dir, reference = text_models(case)
    ours = convert(hf_dir, tmp_path / "mlx")
    assert_close(mlx_lm_logits(ours), reference_logits(reference, IDS))


@needs_mlx_lm
@pytest.mark.parametrize("name", sorted(OUR_QUANT))
def test_our_quantized_folder_loads_in_mlx_lm(text_models, name, tmp_path):
    hf_dir, _ = text_models("plain")
    ours = convert(hf_dir, tmp_path / "mlx", *OUR_QUANT[name])
    assert_close(mlx_lm_logits(ours), our_logits(ours, IDS))


@needs_mlx_lm
def test_mlx_lm_reads_our_tokenizer(text_models, tmp_path):
    import mlx_lm

    hf_dir, _ = text_models("plain")
    ours = convert(hf_dir, tmp_path / "mlx")
    _, theirs = mlx_lm.load(str(ours))
    _, processor = mlx_gemma3.load(ours)
    text = "Hello world! The quick brown fox, 12345."
    # BOS depends on tokenizer_config.json (absent here), so compare the text's own pieces.
    assert theirs.encode(text, add_special_tokens=False) == processor.tokenizer.encode(text, add_bos=False)


# --- mlx-lm's folders in mlx_gemma3 ----------------------------------------------------------------------------


@needs_mlx_lm
@pytest.mark.parametrize("case", ["plain", "linear_rope_x8"])
def test_mlx_lm_float_folder_loads(text_models, case, tmp_path):
    """mlx-lm copies transformers 5's config (rope_parameters only): we still read the x8 scaling from it."""
    hf_dir, reference = text_models(case)
    theirs = mlx_lm_convert(hf_dir, tmp_path / "lm")
    assert_close(our_logits(theirs, IDS), reference_logits(reference, IDS))


@needs_mlx_lm
@pytest.mark.parametrize("name", sorted(THEIR_QUANT))
def test_mlx_lm_quantized_folder_loads(text_models, name, tmp_path):
    hf_dir, _ = text_models("plain")
    theirs = mlx_lm_convert(hf_dir, tmp_path / "lm", **THEIR_QUANT[name])
    assert "quantization" in json.loads((theirs / "config.json").read_text())
    assert_close(our_logits(theirs, IDS), mlx_lm_logits(theirs))


# --- mlx-community layouts, written here from transformers' own weights (no other package needed) --------------


def untied_multimodal_model(seed: int = 12):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=TINY_TEXT,
        vision_config=TINY_VISION,
        mm_tokens_per_image=4,
        tie_word_embeddings=False,
        **TINY_IMAGE_TOKENS,
    )
    return randomize(Gemma3ForConditionalGeneration(config), seed)


MULTIMODAL_KEYS = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.head.", None),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def mlx_community_key(key: str, multimodal: bool) -> str | None:
    """transformers 5 module name → the key mlx-vlm / mlx-lm store (None: not stored); text keys stay as they are."""
    for source, target in MULTIMODAL_KEYS if multimodal else ():
        if key.startswith(source):
            return target and target + key[len(source) :]
    return key


def write_mlx_community_folder(model, folder: Path, with_head: bool, channels_last: bool = True) -> Path:
    """The folder mlx-vlm / mlx-lm write: their keys, the patch conv channels-last, `format: mlx`.

    channels_last=False keeps PyTorch's conv layout: the Hub's own checkpoint layout."""
    model.save_pretrained(folder)  # the config.json (and a model.safetensors replaced below)
    weights, multimodal = {}, hasattr(model.model, "vision_tower")
    for key, tensor in model.state_dict().items():
        target = mlx_community_key(key, multimodal)
        if target is None or (target.endswith("lm_head.weight") and not with_head):
            continue
        if target.endswith("patch_embedding.weight") and channels_last:
            tensor = tensor.permute(0, 2, 3, 1)
        weights[target] = tensor.detach().clone().contiguous()
    for stale in folder.glob("*.safetensors*"):
        stale.unlink()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "mlx" if channels_last else "pt"})
    return folder


def image_features(model) -> np.ndarray:
    with torch.no_grad():
        features = model.model.get_image_features(torch.tensor(PIXELS).permute(0, 3, 1, 2))
    features = getattr(features, "pooler_output", features)
    features = features if isinstance(features, torch.Tensor) else torch.stack(list(features))
    return features.numpy().reshape(PIXELS.shape[0], -1, TINY_TEXT["hidden_size"])


def assert_matches_transformers(folder: Path, reference, multimodal: bool) -> None:
    model, _ = mlx_gemma3.load(folder)
    assert_close(np.array(model(mx.array(IDS)).astype(mx.float32)), reference_logits(reference, IDS))
    if multimodal:
        assert_close(np.array(model.encode_images(mx.array(PIXELS))), image_features(reference))


def test_untied_multimodal_folder_with_its_lm_head_loads(tmp_path):
    reference = untied_multimodal_model()
    folder = write_mlx_community_folder(reference, tmp_path / "vlm", with_head=True)
    assert_matches_transformers(folder, reference, multimodal=True)


def test_untied_text_folder_with_its_lm_head_loads(tmp_path):
    reference = tiny_text_model(seed=13, tie_word_embeddings=False)
    folder = write_mlx_community_folder(reference, tmp_path / "lm", with_head=True)
    assert_matches_transformers(folder, reference, multimodal=False)


@pytest.mark.parametrize("multimodal", [True, False], ids=["multimodal", "text"])
def test_tied_folder_with_a_stored_copy_of_the_head_loads(tmp_path, multimodal):
    """mlx-vlm stores `language_model.lm_head.weight` (a copy of the embedding) even when the head is tied."""
    reference = tiny_multimodal_model(seed=14, image_tokens=TINY_IMAGE_TOKENS) if multimodal else tiny_text_model(14)
    folder = write_mlx_community_folder(reference, tmp_path / "folder", with_head=True)
    assert_matches_transformers(folder, reference, multimodal)
