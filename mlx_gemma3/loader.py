"""load(path): a model from any source — folder, .gguf, Hub id — in one process or sharded, with adapters.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from .distributed.group import check_mode, launched_with_peers
from .distributed.sharded import load_sharded
from .errors import Gemma3Error
from .generation.encode import EmbeddingModel
from .model.config import load_config
from .model.device import default_compute_dtype
from .model.embedding_model import is_sentence_folder, load_sentence_config
from .model.sources import SOURCES, model_folder
from .model.weights import load_embedding_model, load_model, read_weights
from .processing.processor import Processor
from .processing.tokenizer import Tokenizer, sequence_ends
from .train.adapters import apply_adapter_folder


def load(
    path: str | Path,
    compute_dtype: mx.Dtype | None = None,
    lazy_vision: bool = True,
    for_training: bool = False,
    distributed: str | None = None,
    adapter_path: str | Path | None = None,
):
    """Load a Gemma 3 model; returns (model, processor). `path`: an MLX folder, a .gguf file (converted once
    into the cache), or a Hugging Face repo id such as "mlx-community/gemma-3-1b-it-4bit" (downloaded once);
    `mlx_gemma3.demo_model()` is the demo model's folder.

    `lazy_vision`: a multimodal model reads its vision tower when the first image comes; until then its
    parameters are placeholders. `for_training`: plain parameters to train or `save_weights`: both towers
    read now and every array row-major (no CPU column-major layout); floats still in `compute_dtype`.
    `adapter_path`: a folder written by `python -m mlx_gemma3.lora` (adapter_config.json + adapters.safetensors);
    its LoRA/DoRA layers or fine-tuned weights are applied (a multimodal model then reads its vision tower now,
    since the adapters may hold the projector); not with `distributed` yet.

    `distributed`: "pipeline" or "tensor" in a process started by mlx.launch; every rank calls load and the same
    generation calls, and each holds and reads only its share of the weights (see docs/distributed.md)."""
    if distributed is not None:
        check_mode(distributed)
        if adapter_path is not None:
            raise Gemma3Error(
                "adapters (adapter_path) do not run distributed yet: fuse them first "
                "(python -m mlx_gemma3.fuse) and load the fused folder"
            )
    folder = model_path(path)
    config = load_config(folder)
    dtype = compute_dtype or default_compute_dtype()
    if distributed is not None and launched_with_peers():  # else one process holds it all, as without
        if for_training:
            raise Gemma3Error("for_training loads the whole model in one process: pass distributed=None")
        model = load_sharded(folder, config, dtype, distributed)
    else:
        model = load_model(folder, config, dtype, lazy_vision and adapter_path is None, for_training)
    if adapter_path is not None:
        apply_adapter_folder(model, adapter_path)
    return model, Processor.from_folder(folder, config)


def model_path(path) -> Path:
    """`path` resolved to an existing folder (see sources.model_folder), or one clear error."""
    if not isinstance(path, (str, os.PathLike)):
        raise Gemma3Error(
            f"load() needs a model folder path (str or Path), got {type(path).__name__}: pass {SOURCES} "
            "(mlx_gemma3.demo_model() is the demo model)"
        )
    return Path(model_folder(path))


def load_embedding(path: str | Path, compute_dtype: mx.Dtype | None = None) -> EmbeddingModel:
    """Load EmbeddingGemma for mlx_gemma3.embed: an MLX folder written by `python -m mlx_gemma3.convert` from the
    model's sentence-transformers folder (or a Hub repo id of one). Computes in float32 on the CPU and bfloat16 on a
    GPU by default; float16 overflows in Gemma 3's activations and is refused."""
    folder = model_path(path)
    if not is_sentence_folder(folder):
        raise Gemma3Error(
            f"{folder} has no modules.json: an embedding model is an EmbeddingGemma sentence-transformers folder "
            "converted with python -m mlx_gemma3.convert"
        )
    config = load_config(folder)
    if not config.is_embedding:
        raise Gemma3Error(
            f"{folder} is not an EmbeddingGemma model (its config.json lacks use_bidirectional_attention)"
        )
    if "model.embed_tokens.weight" not in read_weights(folder):
        raise Gemma3Error(
            f"{folder} is a sentence-transformers folder as published, not converted: run "
            f"python -m mlx_gemma3.convert --hf-path {folder} --mlx-path OUT (add -q to quantize), then load OUT"
        )
    dtype = compute_dtype or default_compute_dtype()
    if dtype == mx.float16:
        raise Gemma3Error("float16 overflows in EmbeddingGemma's activations: compute in float32 or bfloat16")
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer is None:
        raise Gemma3Error(f"{folder} has no tokenizer.model: copy the model's tokenizer.model into it")
    model = load_embedding_model(folder, config, load_sentence_config(folder, config), dtype)
    return EmbeddingModel(model, tokenizer, sequence_ends(folder))
