"""EmbeddingGemma's sentence-transformers folder → one MLX folder: the text tower as `model.*`, each Dense layer as
`dense.{i}.*`, and the sentence-transformers files (modules, pooling, dense configs, prompts, length) kept beside.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlx_gemma3.errors import Gemma3Error
from mlx_gemma3.model.config import load_config, parse_config
from mlx_gemma3.model.embedding_model import (
    MODULES_FILE,
    PROMPTS_FILE,
    SEQUENCE_FILE,
    Gemma3Embedding,
    load_sentence_config,
    sentence_modules,
)
from mlx_gemma3.model.weights import weight_files

from .hf import (
    Quantization,
    Source,
    check_source_shapes,
    checkpoint_dtype,
    read_headers,
    text_config_json,
    write_folder,
)

DENSE_WEIGHTS = ("linear.weight", "linear.bias")


def convert_sentence_folder(
    hf_path: Path, mlx_path: Path, dtype: str | None = None, force: bool = False, quantize: Quantization | None = None
) -> Path:
    """Convert an EmbeddingGemma sentence-transformers folder (modules.json) into an MLX folder."""
    hf_path, mlx_path = Path(hf_path), Path(mlx_path)
    if mlx_path.resolve() == hf_path.resolve():
        raise Gemma3Error("--mlx-path must differ from --hf-path: the input is never overwritten")
    modules = sentence_modules(hf_path)
    tower = hf_path / modules[0][1]
    config = load_config(tower)
    if config.model_type != "gemma3_text" or not config.is_embedding:
        raise Gemma3Error(
            f"{tower / 'config.json'}: the sentence-transformers model is not EmbeddingGemma (a gemma3_text model "
            "with use_bidirectional_attention)"
        )
    sentence = load_sentence_config(hf_path, config)
    dense = [sub for kind, sub in modules[2:] if kind == "Dense"]
    source = sentence_source(hf_path, tower, dense)
    out_dtype = dtype or checkpoint_dtype(source.headers, source.mapping)
    eos = list(config.eos_token_ids) if len(config.eos_token_ids) != 1 else config.eos_token_ids[0]
    out_config = {**text_config_json(config.text, config.raw, out_dtype), "eos_token_id": eos}
    model = Gemma3Embedding(parse_config(out_config), sentence)
    check_source_shapes(source.headers, source.mapping, model, where=str(hf_path))
    finish = lambda work: copy_sentence_files(hf_path, modules, work)  # noqa: E731
    return write_folder(source, model, out_config, out_dtype, mlx_path, force, quantize, finish)


def sentence_source(hf_path: Path, tower: Path, dense: list[str]) -> Source:
    """The tower's tensors (keys without the `model.` prefix, as Gemma3TextModel saves them) and each Dense
    module's `linear.*`, with the keys they take in the MLX folder."""
    headers = read_headers(weight_files(tower))
    mapping = {key: tower_key(key) for key in headers}
    prefixes = {}
    for i, sub in enumerate(dense):
        files = weight_files(hf_path / sub)
        found = read_headers(files, prefix=f"{sub}/")
        headers.update(found)
        mapping.update({key: dense_key(key, sub, i) for key in found})
        prefixes.update({path: f"{sub}/" for path in files})
    return Source(hf_path.name, headers, mapping, prefixes)


def tower_key(key: str) -> str | None:
    if key.endswith("rotary_emb.inv_freq") or key.startswith("lm_head."):
        return None
    return key if key.startswith("model.") else "model." + key


def dense_key(key: str, sub: str, index: int) -> str:
    name = key.removeprefix(f"{sub}/")
    return f"dense.{index}.{name.removeprefix('linear.')}" if name in DENSE_WEIGHTS else key


def copy_sentence_files(hf_path: Path, modules: list[tuple[str, str]], work: Path) -> None:
    """modules.json (the tower now at the top), each module's config.json without its weights, the prompts and
    the length limit."""
    listed = json.loads((hf_path / MODULES_FILE).read_text(encoding="utf-8"))
    listed[0]["path"] = ""
    (work / MODULES_FILE).write_text(json.dumps(listed, indent=2) + "\n")
    for _, sub in modules[1:]:
        if (hf_path / sub / "config.json").is_file():
            (work / sub).mkdir(exist_ok=True)
            shutil.copyfile(hf_path / sub / "config.json", work / sub / "config.json")
    for path in (hf_path / PROMPTS_FILE, hf_path / modules[0][1] / SEQUENCE_FILE):
        if path.is_file():
            shutil.copyfile(path, work / path.name)
