"""GGUF (llama.cpp) Gemma 3 files → MLX folders; Q4_0, Q8_0 and Q4_K stay quantized, losslessly, as MLX groups of 32.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from mlx_gemma3.errors import Gemma3Error
from mlx_gemma3.model.config import (
    DEFAULT_SLIDING_PATTERN,
    FULL,
    SLIDING,
    layer_types_for_pattern,
    parse_config,
    short_repr,
)
from mlx_gemma3.model.quantize import DEFAULT_BITS, NEVER_QUANTIZED, QuantSpec, quantization_json
from mlx_gemma3.model.weights import build_model, check_shapes
from mlx_gemma3.processing.tokenizer import EOS_IDS

from .gguf_file import GGUFFile, GGUFTensor, read_gguf
from .hf import DTYPES, Quantization, converted, converted_shape, report_size, text_config_json
from .output import ShardWriter, output_folder
from .progress import Progress

# GGUF tensor name (after `blk.N.`) → checkpoint key (after `model.layers.N.`), docs/formats.md §4.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# mmproj files (llama.cpp's clip): `v.blk.N.` names and the rest, docs/formats.md §4.
VISION = "vision_tower.vision_model."
VISION_LAYER_NAMES = {
    "ln1": "layer_norm1",
    "ln2": "layer_norm2",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
VISION_NAMES = {
    "v.patch_embd.weight": VISION + "embeddings.patch_embedding.weight",
    "v.patch_embd.bias": VISION + "embeddings.patch_embedding.bias",
    "v.position_embd.weight": VISION + "embeddings.position_embedding.weight",
    "v.post_ln.weight": VISION + "post_layernorm.weight",
    "v.post_ln.bias": VISION + "post_layernorm.bias",
    "mm.input_projection.weight": "multi_modal_projector.mm_input_projection_weight",
    "mm.soft_emb_norm.weight": "multi_modal_projector.mm_soft_emb_norm.weight",
}
# Stored as Gemma's (1 + w): the text norms, and in an mmproj file only the projector's RMSNorm.
SHIFTED_NORMS = ("norm.weight", "mm_soft_emb_norm.weight")
SLIDING_ROPE_BASE = 10_000.0  # not stored in GGUF files
LOSSLESS = {"Q4_0": 4, "Q8_0": 8, "Q4_K": 4}  # GGML type → MLX bits, in groups of GGML_GROUP_SIZE
GGML_GROUP_SIZE = 32  # values per scale in Q4_0, Q8_0 and Q4_K's sub-blocks
FLOAT_KINDS = ("F32", "F16", "BF16")  # GGML types without blocks
# Values converted at once: bounds the working memory per block of rows (about 10 bytes a value at most).
BLOCK_VALUES = 1 << 20
# The dtype requantized layers are quantized in when --dtype is not given, so their scales and biases take 16
# bits (4-bit group 64: 4.5 bits per weight), as GGML's block scales do.
REQUANTIZED_DTYPE = "float16"


def open_gguf(path: Path) -> GGUFFile:
    """The checked metadata and tensor table of a GGUF file; one clear error for a missing, damaged or foreign file."""
    return read_gguf(Path(path))


def field(reader: GGUFFile, key: str, where: str, default=None, kind: type | None = None):
    """Metadata `key` (or `default`), checked to be a `kind`: int means a positive integer, float any number."""
    value = reader.metadata.get(key, default)
    if value is None:
        raise Gemma3Error(f"{where}: GGUF metadata key {key} is missing")
    if kind is not None and not _is_kind(value, kind):
        wanted = {int: "a positive integer", float: "a number", str: "a string", list: "an array"}[kind]
        raise Gemma3Error(f"{where}: GGUF metadata {key} is {short_repr(value)}, not {wanted} — the file is damaged")
    return value


def _is_kind(value, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int) and value > 0
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def check_architecture(reader, where: str) -> None:
    arch = field(reader, "general.architecture", where, kind=str)
    if arch != "gemma3":
        raise Gemma3Error(
            f"{where}: architecture {short_repr(arch)} is not Gemma 3 (general.architecture must be 'gemma3')"
        )


def config_from_metadata(reader, where: str, dtype: str) -> dict:
    """A gemma3_text config.json from the GGUF metadata (docs/formats.md §4)."""
    check_architecture(reader, where)

    def get(key, default=None, kind=int):
        return field(reader, f"gemma3.{key}", where, default, kind)

    layers, hidden, heads = get("block_count"), get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", max(1, hidden // heads))
    raw = {
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "vocab_size": len(field(reader, "tokenizer.ggml.tokens", where, kind=list)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6, float)),
        # llama.cpp scales the 27B (62 layers) by hidden/heads, every other size by head_dim, as transformers does.
        "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
        "sliding_window": get("attention.sliding_window"),
        "max_position_embeddings": get("context_length"),
        "layer_types": list(layer_types_for_pattern(DEFAULT_SLIDING_PATTERN, layers)),  # not stored in GGUF files
        "rope_parameters": {
            FULL: _rope(reader, where),
            SLIDING: {"rope_type": "default", "rope_theta": SLIDING_ROPE_BASE},
        },
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "eos_token_id": list(EOS_IDS),
        "dtype": dtype,
    }
    config = parse_config(raw, where)
    return text_config_json(config.text, {"eos_token_id": list(EOS_IDS)}, dtype)


def _rope(reader, where: str) -> dict:
    theta = float(field(reader, "gemma3.rope.freq_base", where, 1_000_000.0, float))
    kind = field(reader, "gemma3.rope.scaling.type", where, "none", str)
    if kind in ("none", ""):
        return {"rope_type": "default", "rope_theta": theta}
    if kind != "linear":
        raise Gemma3Error(f"{where}: RoPE scaling {kind!r} is not Gemma 3's (linear)")
    return {
        "rope_type": "linear",
        "rope_theta": theta,
        "factor": float(field(reader, "gemma3.rope.scaling.factor", where, kind=float)),
    }


def tensor_key(name: str) -> str | None:
    """GGUF tensor name → checkpoint key (None for names Gemma 3 does not use)."""
    stem, _, suffix = name.rpartition(".")
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def vision_key(name: str) -> str | None:
    """mmproj tensor name → checkpoint key (None for names Gemma 3 does not use)."""
    if name in VISION_NAMES:
        return VISION_NAMES[name]
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 4 and parts[:2] == ["v", "blk"] and parts[3] in VISION_LAYER_NAMES:
        return f"{VISION}encoder.layers.{parts[2]}.{VISION_LAYER_NAMES[parts[3]]}.{suffix}"
    return None


def multimodal_config(text: dict, reader, tokens: list[str], where: str) -> dict:
    """A gemma3 config.json: the text part, the SigLIP sizes from the mmproj metadata, the image token ids."""
    projector = field(reader, "clip.projector_type", where, "gemma3", str)
    if projector != "gemma3":
        raise Gemma3Error(
            f"{where}: projector type {projector!r} is not Gemma 3's (clip.projector_type must be 'gemma3')"
        )

    def get(key, default=None, kind=int):
        return field(reader, f"clip.vision.{key}", where, default, kind)

    image_size, patch_size = get("image_size"), get("patch_size")
    per_side = image_size // patch_size // get("projector.scale_factor", 4)
    position = {piece: i for i, piece in enumerate(tokens)}
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": get("attention.head_count"),
        "image_size": image_size,
        "patch_size": patch_size,
        "layer_norm_eps": float(get("attention.layer_norm_epsilon", 1e-6, float)),
        "vision_use_head": False,
    }
    return {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text,
        "vision_config": vision,
        "mm_tokens_per_image": per_side * per_side,
        "boi_token_index": position.get("<start_of_image>", 255_999),
        "eoi_token_index": position.get("<end_of_image>", 256_000),
        "image_token_index": position.get("<image_soft_token>", len(tokens)),  # Gemma appends it after the vocab
        "eos_token_id": text["eos_token_id"],
        "tie_word_embeddings": text["tie_word_embeddings"],
        "dtype": text["dtype"],
    }


def dequantized(raw: np.ndarray, kind) -> np.ndarray:
    """Rows of GGML data (uint8 [rows, bytes per row], or the reader's typed view) as float32 [rows, values]."""
    import gguf

    return np.asarray(gguf.quants.dequantize(raw, kind), dtype=np.float32)


def check_types(tensors: dict[str, Source]) -> None:
    """One clear error, before anything is written, for a tensor stored in a GGML type we cannot read."""
    for source in tensors.values():
        if len(source.shape) < 2 and source.kind.name not in FLOAT_KINDS:
            raise Gemma3Error(
                f"{source.path}: tensor {source.tensor.name} is a vector stored as {source.kind.name}; "
                "the converter reads only matrices quantized (GGUF files keep vectors in float)"
            )
        if not dequantizable(source.kind):
            raise Gemma3Error(
                f"{source.path}: tensor {source.tensor.name} is stored as {source.kind.name}, which the gguf package "
                "cannot dequantize: convert the model from its Hugging Face checkpoint instead"
            )


@functools.cache
def dequantizable(kind) -> bool:
    """Whether the gguf package dequantizes a GGML type (it does not know them all)."""
    import gguf

    _, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    try:
        dequantized(np.zeros((1, block_bytes), np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def lossless_spec(kind) -> QuantSpec | None:
    """The MLX groups that hold a GGML type exactly, or None for the types MLX cannot hold as they are."""
    return QuantSpec(LOSSLESS[kind.name], GGML_GROUP_SIZE) if kind.name in LOSSLESS else None


def lossless_parts(raw: np.ndarray, kind) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint32 weight, float32 scales, float32 biases) of rows of a Q4_0, Q8_0 or Q4_K tensor, MLX affine,
    group 32, whose dequantization equals GGML's bit for bit."""
    rows = raw.shape[0]
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, -1)
    q, scales, biases = {"Q4_0": _q4_0, "Q8_0": _q8_0, "Q4_K": _q4_k}[kind.name](blocks, rows)
    return pack(q, LOSSLESS[kind.name]), scales, biases


def _q8_0(blocks: np.ndarray, rows: int):
    """Q8_0 block: fp16 d, 32 × int8 q; x = d·q = d·(q + 128) − 128·d."""
    blocks = blocks.reshape(rows, -1, 34)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).astype(np.int16) + 128
    return q.reshape(rows, -1).astype(np.uint8), d, -128 * d


def _q4_0(blocks: np.ndarray, rows: int):
    """Q4_0 block: fp16 d, 16 bytes holding elements 0–15 in low nibbles and 16–31 in high; x = d·(q − 8)."""
    blocks = blocks.reshape(rows, -1, 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
    return q.reshape(rows, -1), d, -8 * d


def _q4_k(blocks: np.ndarray, rows: int):
    """Q4_K super-block of 256: fp16 d and dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32,
    then 4 × 32 bytes, each holding one sub-block in low nibbles and the next in high; x = d·sc·q − dmin·m."""
    blocks = blocks.reshape(rows, -1, 144)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 4:16]
    low, high, extra = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([low & 0x3F, (extra & 0x0F) | ((low >> 2) & 0x30)], axis=-1).astype(np.float32)
    m = np.concatenate([high & 0x3F, (extra >> 4) | ((high >> 2) & 0x30)], axis=-1).astype(np.float32)
    qs = blocks[..., 16:].reshape(rows, -1, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=3)  # [rows, super-blocks, 4 chunks, low/high, 32]
    scales = (d[..., None] * sc).reshape(rows, -1)
    biases = -(dmin[..., None] * m).reshape(rows, -1)
    return q.reshape(rows, -1), scales, biases


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values [rows, n] → MLX's packing: uint32 words, the first value in the lowest bits."""
    q = q.astype(np.uint32)
    per_word = 32 // bits
    words = q.reshape(q.shape[0], -1, per_word) << (bits * np.arange(per_word, dtype=np.uint32))
    return np.bitwise_or.reduce(words, axis=-1).astype(np.uint32)


class Source(NamedTuple):
    """A tensor of a GGUF file, read from the file in blocks of leading rows: not through the reader's memory
    map, whose pages would stay resident until the end."""

    tensor: GGUFTensor
    path: Path

    @property
    def kind(self):
        return self.tensor.tensor_type

    @property
    def shape(self) -> tuple[int, ...]:
        """As in the checkpoint: GGUF lists the dimensions innermost first."""
        return tuple(int(n) for n in reversed(self.tensor.shape))

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the leading dimension as raw bytes, uint8 [rows, bytes per row]."""
        per_row = int(self.tensor.n_bytes) // self.shape[0]
        count = (stop - start) * per_row
        try:
            with open(self.path, "rb") as f:
                data = os.pread(f.fileno(), count, int(self.tensor.data_offset) + start * per_row)
        except OSError as e:
            raise Gemma3Error(f"cannot read tensor {self.tensor.name} from {self.path}: {e}") from None
        if len(data) != count:
            raise Gemma3Error(f"{self.path} changed during the conversion: tensor {self.tensor.name} lies past its end")
        return np.frombuffer(data, np.uint8).reshape(stop - start, per_row)


class Conversion(NamedTuple):
    """Everything read and checked from the GGUF file(s) before a byte is written."""

    config: dict
    tokenizer: bytes
    template: str | None
    tensors: dict[str, Source]
    model: object
    plan: dict
    outcomes: Counter


def read_conversion(
    gguf_path: Path, dtype: str | None = None, quantize: Quantization | None = None, mmproj: Path | None = None
) -> Conversion:
    """Read and check a GGUF file's metadata, tokenizer and tensor table (not its tensor data) against Gemma 3."""
    from .gguf_tokenizer import chat_template, sentencepiece_model

    where = str(gguf_path)
    reader = open_gguf(gguf_path)
    check_architecture(reader, where)
    tokenizer, template = sentencepiece_model(reader, where), chat_template(reader)
    config = config_from_metadata(reader, where, dtype or "float32")
    tensors = {tensor_key(t.name): Source(t, gguf_path) for t in reader.tensors if tensor_key(t.name)}
    if mmproj is not None:
        vision_reader = open_gguf(Path(mmproj))
        tokens = [str(t) for t in field(reader, "tokenizer.ggml.tokens", where, kind=list)]
        config = multimodal_config(config, vision_reader, tokens, str(mmproj))
        tensors = {f"language_model.{k}": t for k, t in tensors.items()}
        tensors.update(
            {vision_key(t.name): Source(t, Path(mmproj)) for t in vision_reader.tensors if vision_key(t.name)}
        )
    check_types(tensors)
    model = build_model(parse_config(config, where))
    shapes = {k: converted_shape(k, t.shape) for k, t in tensors.items()}
    check_shapes(model, shapes, where, {k: t.tensor.name for k, t in tensors.items()})
    plan, outcomes = tensor_plan(tensors, model, quantize)
    if any(plan.values()):
        defaults = (quantize.bits, quantize.group_size) if quantize else (DEFAULT_BITS, GGML_GROUP_SIZE)
        config["quantization"] = quantization_json(plan, *defaults)
    return Conversion(config, tokenizer, template, tensors, model, plan, outcomes)


def convert_gguf(
    gguf_path: Path,
    mlx_path: Path,
    dtype: str | None = None,
    force: bool = False,
    quantize: Quantization | None = None,
    mmproj: Path | None = None,
) -> Path:
    """Convert a Gemma 3 GGUF file (and its mmproj file for images) to an MLX folder, lossless where MLX's
    groups can hold GGML's blocks; tensor by tensor, in blocks of rows, so memory stays near one block."""
    gguf_path, mlx_path = Path(gguf_path), Path(mlx_path)
    read = read_conversion(gguf_path, dtype, quantize, mmproj)
    dtypes = (DTYPES[dtype or "float32"], DTYPES[dtype or REQUANTIZED_DTYPE])
    with output_folder(mlx_path, force) as work:
        writer = ShardWriter(work)
        total = sum(int(t.tensor.n_bytes) for t in read.tensors.values())
        with Progress(total, f"converting {gguf_path.name}") as progress:
            for key, source in read.tensors.items():
                write_tensor(writer, key, source, read.plan.get(key.removesuffix(".weight")), dtypes, progress)
        writer.close()
        if quantize:
            print(requantize_summary(read.outcomes, quantize), file=sys.stderr)
        report_size(read.model, writer)
        (work / "config.json").write_text(json.dumps(read.config, indent=2) + "\n")
        (work / "tokenizer.model").write_bytes(read.tokenizer)
        if read.template:
            (work / "chat_template.jinja").write_text(read.template, encoding="utf-8")
    return mlx_path


def tensor_plan(tensors: dict[str, Source], model, quantize: Quantization | None) -> tuple[dict, Counter]:
    """Layer path → how it is stored (QuantSpec, or None for float), and how many weights went which way."""
    from mlx_gemma3.model.quantize import quantization_plan

    asked = quantization_plan(model, quantize.recipe, quantize.bits, quantize.group_size) if quantize else {}
    plan, outcomes = {}, Counter()
    for key, source in tensors.items():
        path = key.removesuffix(".weight")
        if not key.endswith(".weight") or len(source.shape) != 2 or path.endswith(NEVER_QUANTIZED):
            continue
        plan[path], outcome = storage(source.kind, asked.get(path), quantize)
        outcomes[outcome] += 1
    return plan, outcomes


def storage(kind, wanted: QuantSpec | None, quantize: Quantization | None) -> tuple[QuantSpec | None, tuple[str, str]]:
    """How one weight is stored, and why: GGML's lossless types at their own bits in groups of 32, other types
    in float; with -q, requantized as asked unless lossless and at or below the asked bits."""
    stored = lossless_spec(kind)
    if quantize is None:
        return stored, ("kept", kind.name)
    if stored is not None and wanted is None:
        return stored, ("kept", f"as stored ({kind.name}): the group size does not divide its width")
    if stored is not None and stored.bits <= wanted.bits:
        return stored, (
            "kept",
            f"as stored ({kind.name}): lossless {stored.bits}-bit, not above the {wanted.bits} bits asked",
        )
    if wanted is None:
        return None, ("kept", f"in float ({kind.name}): the group size does not divide its width")
    return wanted, ("requantized", kind.name)


def requantize_summary(outcomes: Counter, quantize: Quantization) -> str:
    """One line: what -q requantized, and what it left as it was and why."""
    requantized = Counter({kind: n for (what, kind), n in outcomes.items() if what == "requantized"})
    recipe = "" if quantize.recipe == "uniform" else f", {quantize.recipe} recipe"
    kinds = ", ".join(f"{n} {kind}" for kind, n in requantized.most_common())
    done = f"requantized {requantized.total()} tensors ({kinds})" if requantized else "requantized no tensor"
    parts = [f"{done} to {quantize.bits}-bit, group {quantize.group_size}{recipe}"]
    parts += [f"kept {n} {why}" for (what, why), n in outcomes.items() if what == "kept"]
    return "; ".join(parts)


def write_tensor(writer: ShardWriter, key: str, source: Source, spec: QuantSpec | None, dtypes, progress) -> None:
    """Convert and write one tensor in blocks of rows; each block is on disk before the next is read."""
    rows = source.shape[0]
    step = max(1, BLOCK_VALUES // math.prod(source.shape[1:]))
    path = key.removesuffix(".weight")
    names = [key] if spec is None else [f"{path}.weight", f"{path}.scales", f"{path}.biases"]
    slots = None
    for start in range(0, rows, step):
        raw = source.read_rows(start, min(start + step, rows))
        arrays = converted_block(key, source, raw, spec, dtypes)
        slots = slots or [writer.reserve(n, a.dtype, (rows, *a.shape[1:])) for n, a in zip(names, arrays)]
        for slot, array in zip(slots, arrays):
            slot.write(start, array)
        progress.advance(raw.nbytes)


def converted_block(key: str, source: Source, raw: np.ndarray, spec: QuantSpec | None, dtypes) -> list[mx.array]:
    """Rows of one tensor in our layout: [float values] (norms shifted back by 1), or a quantized layer's
    [weight, scales, biases], copied from GGML's blocks when they are lossless, else requantized."""
    float_dtype, quantized_dtype = dtypes
    if spec is not None and spec == lossless_spec(source.kind):
        return [mx.array(part) for part in lossless_parts(raw, source.kind)]
    values = dequantized(raw, source.kind).reshape(raw.shape[0], *source.shape[1:])
    if key.endswith(SHIFTED_NORMS) and not key.startswith(VISION):
        values = values - np.float32(1.0)  # GGUF stores Gemma's (1 + w)
    array = converted(key, mx.array(values))
    if spec is None:
        return [array.astype(float_dtype)]
    return list(mx.quantize(array.astype(quantized_dtype), group_size=spec.group_size, bits=spec.bits))
