"""mlx_gemma3.load on good and bad folders."""

from __future__ import annotations

import mlx.core as mx
import pytest
from safetensors.numpy import load_file, save_file

import mlx_gemma3
from conftest import convert


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
