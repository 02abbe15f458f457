"""mlx_gemma3.model.weights on good and bad folders."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import convert
from safetensors.numpy import load_file, save_file

import mlx_gemma3


def test_load_returns_model_and_processor(hf_text, tmp_path):
    model, processor = mlx_gemma3.load(convert(hf_text[0], tmp_path / "mlx"))
    logits = model(mx.array([[2, 10, 11]]))
    assert logits.shape == (1, 3, 512) and logits.dtype == mx.float32
    assert processor.config.text.num_hidden_layers == 6


def test_load_missing_folder(tmp_path):
    with pytest.raises(mlx_gemma3.Gemma3Error, match="does not exist"):
        mlx_gemma3.load(tmp_path / "nowhere")


def test_load_missing_tensor(hf_text, tmp_path):
    folder = convert(hf_text[0], tmp_path / "mlx")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(mlx_gemma3.Gemma3Error, match="missing tensor model.norm.weight"):
        mlx_gemma3.load(folder)


def _matmul_weights(model):
    import mlx.nn as nn

    return {path: m.weight for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}


def test_cpu_float32_matmul_weights_are_column_major(hf_text, tmp_path):
    folder = convert(hf_text[0], tmp_path / "mlx")
    stored = load_file(folder / "model.safetensors")
    with mx.stream(mx.cpu):  # the layout is the CPU's; a Mac's default device is the GPU
        model, _ = mlx_gemma3.load(folder)
    weights = _matmul_weights(model)
    assert "model.embed_tokens" in weights and "model.layers.0.mlp.down_proj" in weights
    for path, w in weights.items():
        assert memoryview(w).strides == (4, 4 * w.shape[0]), path
        np.testing.assert_array_equal(np.array(w), stored[f"{path}.weight"].astype(np.float32), err_msg=path)


def test_half_precision_weights_keep_row_major(hf_text, tmp_path):
    model, _ = mlx_gemma3.load(convert(hf_text[0], tmp_path / "mlx"), compute_dtype=mx.bfloat16)
    for path, w in _matmul_weights(model).items():
        assert memoryview(w).strides == (2 * w.shape[1], 2), path


@pytest.fixture(scope="module")
def multimodal_folder(converted_tiny):
    from conftest import TINY_IMAGE_TOKENS

    return converted_tiny(seed=5, vision=True, image_tokens=TINY_IMAGE_TOKENS).folder


def test_load_for_training_saves_the_folders_own_tensors(multimodal_folder, tmp_path):
    stored = load_file(multimodal_folder / "model.safetensors")
    assert any(k.startswith("vision_tower.") for k in stored)
    with mx.stream(mx.cpu):  # where the inference load would lay weights out column-major
        model, _ = mlx_gemma3.load(multimodal_folder, for_training=True)
    assert not model.vision_deferred
    for path, w in _matmul_weights(model).items():
        assert memoryview(w).strides == (4 * w.shape[1], 4), path
    model.save_weights(str(tmp_path / "saved.safetensors"))
    saved = load_file(tmp_path / "saved.safetensors")
    assert sorted(saved) == sorted(stored)
    for key, value in stored.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)


def test_default_load_still_defers_the_vision_tower(multimodal_folder):
    model, _ = mlx_gemma3.load(multimodal_folder)
    assert model.vision_deferred
    model, _ = mlx_gemma3.load(multimodal_folder, lazy_vision=False)
    assert not model.vision_deferred


@pytest.mark.parametrize("path", [None, 3, b"folder"])
def test_load_bad_path_type(path):
    with pytest.raises(mlx_gemma3.Gemma3Error, match="needs a model folder path"):
        mlx_gemma3.load(path)
