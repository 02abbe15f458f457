"""Hugging Face Gemma 3 checkpoints (safetensors, single or sharded) → MLX folders.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from safetensors import safe_open

from mlx_gemma3.errors import Gemma3Error
from mlx_gemma3.model.config import FLOAT_DTYPES, FULL, SLIDING, ModelConfig, TextConfig, load_config, parse_config
from mlx_gemma3.model.quantize import (
    DEFAULT_BITS,
    DEFAULT_GROUP_SIZE,
    parameter_count,
    quantization_json,
    quantization_plan,
)
from mlx_gemma3.model.weights import build_model, check_shapes, unwrapped_key, weight_files

from .output import ShardWriter, output_folder
from .progress import Progress

# Every layout of the text tower's keys (docs/formats.md §3), most specific first.
TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("language_model.", "model."),  # transformers 5's Gemma3Model layout once a ShieldGemma 2 wrapper is unwrapped
)
# The vision tower and projector (docs/formats.md §3), most specific first; transformers 5 drops `vision_model.`.
VISION_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
)
UNUSED_VISION_PREFIXES = ("vision_tower.head.", "model.vision_tower.head.", "vision_tower.vision_model.head.")
SHIELD_ARCHITECTURE = "ShieldGemma2ForImageClassification"
PATCH_CONV = "vision_tower.vision_model.embeddings.patch_embedding.weight"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)
DTYPES = {name: getattr(mx, name) for name in FLOAT_DTYPES}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1}


def map_key(key: str, config: ModelConfig) -> str | None:
    """Checkpoint key → our key, or None for a tensor we do not use."""
    key = unwrapped_key(key, config)
    if key.startswith(UNUSED_VISION_PREFIXES) or key.endswith("rotary_emb.inv_freq"):
        return None
    for source, target in VISION_PREFIXES:
        if key.startswith(source):
            return target + key[len(source) :] if config.is_multimodal else None
    for source, target in TEXT_PREFIXES:
        if key.startswith(source):
            mapped = target + key[len(source) :]
            if mapped.startswith("lm_head.") and config.text.tie_word_embeddings:
                return None  # the tied head is the embedding
            return "language_model." + mapped if config.is_multimodal else mapped
    return key  # unknown: reported as unexpected by the shape check


def converted(target: str, tensor: mx.array) -> mx.array:
    """A tensor in our layout: the patch conv goes from [out, in, kh, kw] to MLX's [out, kh, kw, in]."""
    return tensor.transpose(0, 2, 3, 1) if target == PATCH_CONV else tensor


def converted_shape(target: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], *shape[2:], shape[1]) if target == PATCH_CONV and len(shape) == 4 else shape


def read_headers(files: list[Path], prefix: str = "") -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """prefix + key → (file, shape, dtype) from the safetensors headers, without reading tensor data."""
    found = {}
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    found[prefix + key] = (path, tuple(tensor.get_shape()), tensor.get_dtype())
        except Exception as e:  # safetensors raises its own error type for damaged files
            raise Gemma3Error(f"cannot read {path}: {e} — the file is truncated or not safetensors") from None
    return found


def text_config_json(text: TextConfig, base: dict, dtype: str) -> dict:
    """A gemma3_text config.json that both transformers (5 and older) and mlx-lm read the same way."""
    out = {k: v for k, v in base.items() if k not in ("rope_scaling", "text_config", "vision_config")}
    pattern = _sliding_pattern(text.layer_types)
    out.update(
        model_type="gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        vocab_size=text.vocab_size,
        rms_norm_eps=text.rms_norm_eps,
        query_pre_attn_scalar=_json_number(text.query_pre_attn_scalar),
        sliding_window=text.sliding_window,
        layer_types=list(text.layer_types),
        max_position_embeddings=text.max_position_embeddings,
        final_logit_softcapping=text.final_logit_softcapping,
        tie_word_embeddings=text.tie_word_embeddings,
        hidden_activation="gelu_pytorch_tanh",
        rope_theta=text.rope_full.theta,
        rope_local_base_freq=text.rope_sliding.theta,
        rope_parameters={
            FULL: _rope_json(text.rope_full),
            SLIDING: _rope_json(text.rope_sliding),
        },
        dtype=dtype,
    )
    if text.bidirectional:  # EmbeddingGemma's tower: the base model class, attention both ways
        out.update(architectures=["Gemma3TextModel"], use_bidirectional_attention=True)
    if text.rope_full.factor != 1.0:
        out["rope_scaling"] = {"rope_type": "linear", "factor": text.rope_full.factor}
    if pattern is not None:
        out["sliding_window_pattern"] = pattern
    out.pop("torch_dtype", None)
    out.pop("_sliding_window_pattern", None)
    return out


def _json_number(value: float) -> int | float:
    """An integral float as an int: transformers' config classes refuse 16.0 where they declare int."""
    return int(value) if float(value).is_integer() else value


def _rope_json(rope) -> dict:
    if rope.factor == 1.0:
        return {"rope_type": "default", "rope_theta": rope.theta}
    return {"rope_type": "linear", "factor": rope.factor, "rope_theta": rope.theta}


def _sliding_pattern(layer_types: tuple[str, ...]) -> int | None:
    """The legacy `sliding_window_pattern` that reproduces `layer_types`, if one does."""
    n = len(layer_types)
    for pattern in range(1, n + 2):
        if all((layer_types[i] == FULL) == ((i + 1) % pattern == 0) for i in range(n)):
            return pattern
    return None


@dataclass(frozen=True)
class Quantization:
    """What -q asks for: default bits and group size, and the recipe that picks per-layer exceptions."""

    bits: int = DEFAULT_BITS
    group_size: int = DEFAULT_GROUP_SIZE
    recipe: str = "uniform"


def convert_hf(
    hf_path: Path, mlx_path: Path, dtype: str | None = None, force: bool = False, quantize: Quantization | None = None
) -> Path:
    """Convert a Hugging Face Gemma 3 folder to an MLX folder (quantized when `quantize` is given)."""
    hf_path, mlx_path = Path(hf_path), Path(mlx_path)
    if not hf_path.is_dir():
        raise Gemma3Error(f"input folder {hf_path} does not exist")
    if mlx_path.resolve() == hf_path.resolve():
        raise Gemma3Error("--mlx-path must differ from --hf-path: the input is never overwritten")
    config = load_config(hf_path)
    headers = read_headers(weight_files(hf_path))
    mapping = {key: map_key(key, config) for key in headers}
    out_dtype = dtype or checkpoint_dtype(headers, mapping)
    out_config = config_json(config, out_dtype)
    model = check_source_shapes(headers, mapping, build_model(parse_config(out_config)), where=str(hf_path))
    source = Source(hf_path.name, headers, mapping)
    return write_folder(source, model, out_config, out_dtype, mlx_path, force, quantize, lambda work: None)


@dataclass(frozen=True)
class Source:
    """A checkpoint to convert: its name, its tensors (source key → file, shape, dtype) and where each goes (our
    key, or None to drop it); `prefixes`: the source-key prefix of the tensors of each file that has one."""

    name: str
    headers: dict[str, tuple[Path, tuple[int, ...], str]]
    mapping: dict[str, str | None]
    prefixes: dict[Path, str] = field(default_factory=dict)


def write_folder(
    source: Source,
    model,
    out_config: dict,
    out_dtype: str,
    mlx_path: Path,
    force: bool,
    quantize: Quantization | None,
    finish: Callable[[Path], None],
) -> Path:
    """Write the MLX folder: the tensors (quantized as asked), config.json, the tokenizer files of the source's
    folders, then whatever `finish(work folder)` adds; all or nothing."""
    plan = {}
    if quantize is not None:
        plan = quantization_plan(model, quantize.recipe, quantize.bits, quantize.group_size)
        out_config["quantization"] = quantization_json(plan, quantize.bits, quantize.group_size)
    headers = source.headers
    total = sum(math.prod(shape) * ITEMSIZE.get(dtype, 4) for _, shape, dtype in headers.values())
    with output_folder(mlx_path, force) as work:
        writer = ShardWriter(work)
        with Progress(total, f"converting {source.name}") as progress:
            for path in sorted({p for p, _, _ in headers.values()}):
                prefix = source.prefixes.get(path, "")
                _convert_shard(path, source.mapping, DTYPES[out_dtype], writer, plan, progress, prefix)
                writer.flush()  # one output shard per input shard keeps peak memory near the largest input shard
        writer.close()
        report_size(model, writer)
        (work / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        for folder in sorted({p.parent for p, _, _ in headers.values()}, reverse=True):
            _copy_tokenizer(folder, work)
        finish(work)
    return mlx_path


def config_json(config: ModelConfig, dtype: str) -> dict:
    """The output config.json: gemma3_text, or gemma3 with the text part rewritten and the vision part kept."""
    eos = list(config.eos_token_ids) if len(config.eos_token_ids) != 1 else config.eos_token_ids[0]
    if not config.is_multimodal:
        return {**text_config_json(config.text, config.raw, dtype), "eos_token_id": eos}
    out = {k: v for k, v in config.raw.items() if k != "torch_dtype"}
    out.update(
        architectures=[SHIELD_ARCHITECTURE if config.is_shield else "Gemma3ForConditionalGeneration"],
        text_config=text_config_json(config.text, config.raw.get("text_config") or {}, dtype),
        vision_config=config.raw.get("vision_config") or {},
        dtype=dtype,
        eos_token_id=eos,
    )
    return out


def checkpoint_dtype(headers: dict, mapping: dict) -> str:
    for key, (_, _, dtype) in headers.items():
        if mapping[key] in ("model.embed_tokens.weight", "language_model.model.embed_tokens.weight"):
            return SAFETENSORS_DTYPES.get(dtype, "bfloat16")
    return "bfloat16"


def check_source_shapes(headers: dict, mapping: dict, model, where: str):
    """`model` (in float), which the checkpoint must fill; raises on a missing, unexpected or mis-shaped tensor."""
    found = {mapping[k]: converted_shape(mapping[k], shape) for k, (_, shape, _) in headers.items() if mapping[k]}
    source = {mapping[k]: k for k in headers if mapping[k] is not None}
    check_shapes(model, found, where, source)
    return model


def report_size(model, writer: ShardWriter) -> None:
    parameters = parameter_count(model)
    print(f"{parameters:,} parameters, {8 * writer.total_bytes / parameters:.2f} bits per weight", file=sys.stderr)


def _convert_shard(
    path: Path, mapping: dict, dtype: mx.Dtype, writer: ShardWriter, plan: dict, progress, prefix: str = ""
) -> None:
    """Convert one input shard tensor by tensor, each evaluated before the next so its input can be freed."""
    try:
        tensors = mx.load(str(path), format="safetensors")
    except Exception as e:
        raise Gemma3Error(f"cannot read {path}: {e}") from None
    for key in sorted(tensors):
        target, tensor = mapping.get(prefix + key), tensors.pop(key)
        progress.advance(tensor.nbytes)
        if target is None:
            continue
        tensor = converted(target, tensor).astype(dtype)
        spec = plan.get(target.removesuffix(".weight")) if target.endswith(".weight") else None
        if spec is None:
            mx.eval(tensor)
            writer.add(target, tensor)
            continue
        parts = mx.quantize(tensor, group_size=spec.group_size, bits=spec.bits)
        mx.eval(parts)
        for suffix, part in zip(("weight", "scales", "biases"), parts):
            writer.add(target.removesuffix("weight") + suffix, part)


def _copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
