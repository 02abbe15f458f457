"""Gemma 3 config.json → frozen dataclasses, for both key generations and both layouts.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import Gemma3Error

TEXT_MODEL_TYPES = ("gemma3_text",)
SHIELD_MODEL_TYPE = "shieldgemma2"  # ShieldGemma 2: a Gemma 3 4B image-text model read as a Yes/No classifier
MULTIMODAL_MODEL_TYPES = ("gemma3", SHIELD_MODEL_TYPE)
FULL, SLIDING = "full_attention", "sliding_attention"
DEFAULT_SLIDING_PATTERN = 6  # five sliding layers, then one full layer

# Gemma3TextConfig's class defaults: a multimodal config's `text_config` omits any key equal to these.
TEXT_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": DEFAULT_SLIDING_PATTERN,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "tie_word_embeddings": True,
    "hidden_activation": "gelu_pytorch_tanh",
}
# SiglipVisionConfig as Gemma 3 uses it; a config.json's vision_config omits keys equal to these.
VISION_DEFAULTS = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 896,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
}
IMAGE_TOKEN_DEFAULTS = {"mm_tokens_per_image": 256, "image_token_index": 262_144, "boi_token_index": 255_999}
IMAGE_TOKEN_DEFAULTS["eoi_token_index"] = 256_000
# A standalone `gemma3_text` config.json must name the shape of the network itself.
REQUIRED_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # the float dtypes weights and computations may use
MAX_SIZE = 2**31 - 1  # MLX array dimensions are 32-bit: a larger size cannot be a real checkpoint's
MAX_LAYERS = 1024  # far above any Gemma 3 (62 at most); refused before a model of that many layers is built


@dataclass(frozen=True)
class RopeConfig:
    """RoPE for one layer type: base frequency and linear position scaling factor."""

    theta: float
    factor: float = 1.0


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_full: RopeConfig
    rope_sliding: RopeConfig
    max_position_embeddings: int
    final_logit_softcapping: float | None
    tie_word_embeddings: bool
    weight_dtype: str
    # EmbeddingGemma: every token sees every other (no causal mask); a sliding layer sees a band of
    # sliding_window // 2 tokens on each side, as transformers turns the window into a symmetric band.
    bidirectional: bool = False

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def rope(self, layer: int) -> RopeConfig:
        return self.rope_sliding if self.is_sliding(layer) else self.rope_full

    @property
    def embed_scale(self) -> float:
        """sqrt(hidden) rounded to the checkpoint's dtype, as transformers computes it."""
        return round_to_dtype(math.sqrt(self.hidden_size), self.weight_dtype)


@dataclass(frozen=True)
class VisionConfig:
    """The SigLIP tower and how its output becomes image tokens."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    tokens_per_image: int
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pool(self) -> int:
        """Side of the average-pooling window that turns the patch grid into tokens_per_image tokens."""
        return self.patches_per_side // math.isqrt(self.tokens_per_image)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: TextConfig
    eos_token_ids: tuple[int, ...]
    raw: dict  # the config.json as read, for writers that must keep unknown keys
    vision: VisionConfig | None = None

    @property
    def is_multimodal(self) -> bool:
        return self.model_type in MULTIMODAL_MODEL_TYPES

    @property
    def is_shield(self) -> bool:
        return self.model_type == SHIELD_MODEL_TYPE

    @property
    def is_embedding(self) -> bool:
        """EmbeddingGemma's text tower (use_bidirectional_attention): it encodes, it does not generate."""
        return self.text.bidirectional


def round_to_dtype(value: float, dtype: str) -> float:
    """Round a Python float to a float dtype's precision (bfloat16: 8 bits of mantissa)."""
    import numpy as np

    if dtype == "float32":
        return float(np.float32(value))
    if dtype == "float16":
        return float(np.float16(value))
    if dtype == "bfloat16":
        bits = np.array([value], dtype=np.float32).view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even
        return float(rounded.astype(np.uint32).view(np.float32)[0])
    raise Gemma3Error(f"unsupported weight dtype {dtype!r}: use one of {', '.join(FLOAT_DTYPES)}")


def load_config(folder: str | Path) -> ModelConfig:
    """Read `folder/config.json`."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise Gemma3Error(f"no config.json in {folder}: point at a Gemma 3 model folder")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Gemma3Error(f"{path} is not valid JSON ({e})") from None
    return parse_config(raw, where=str(path))


def parse_config(raw: dict, where: str = "config.json") -> ModelConfig:
    if not isinstance(raw, dict):
        raise Gemma3Error(f"{where}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type in TEXT_MODEL_TYPES:
        text = parse_text_config(raw, where, fill_defaults=False, top=raw)
    elif model_type in MULTIMODAL_MODEL_TYPES:
        text_raw = _section(raw, "text_config", where)
        text = parse_text_config(text_raw, where + " text_config", fill_defaults=True, top=raw)
    else:
        supported = ", ".join(TEXT_MODEL_TYPES + MULTIMODAL_MODEL_TYPES)
        raise Gemma3Error(f"{where}: model_type {model_type!r} is not Gemma 3 (supported: {supported})")
    eos = raw.get("eos_token_id", text_raw.get("eos_token_id", 1) if model_type in MULTIMODAL_MODEL_TYPES else 1)
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if isinstance(eos, int) else ()
    vision = parse_vision_config(raw, where) if model_type in MULTIMODAL_MODEL_TYPES else None
    return ModelConfig(model_type=model_type, text=text, eos_token_ids=eos_ids, raw=raw, vision=vision)


def _section(raw: dict, key: str, where: str) -> dict:
    """A nested object of the config (absent or null: empty)."""
    section = raw.get(key) or {}
    if not isinstance(section, dict):
        raise Gemma3Error(f"{where}: {key} must be a JSON object, got {short_repr(section)}")
    return section


def short_repr(value) -> str:
    """A value for an error line: at most 60 characters, whatever it holds."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _size(value, key: str, where: str, limit: int = MAX_SIZE) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
        raise Gemma3Error(f"{where}: {key} must be a positive integer up to {limit}, got {short_repr(value)}")
    return value


def _number(value, key: str, where: str) -> float:
    """A positive finite number (every float of a Gemma 3 config is one: norm eps, scalar, RoPE base and factor)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise Gemma3Error(f"{where}: {key} must be a positive number, got {short_repr(value)}")
    return float(value)


def parse_vision_config(raw: dict, where: str) -> VisionConfig:
    vision_raw = _section(raw, "vision_config", where)
    where_vision = where + " vision_config"

    def get(source: dict, defaults: dict, key: str, name: str = "") -> int:
        return _size(source.get(name or key, source.get(key, defaults[key])), key, where_vision)

    sizes = {k: get(vision_raw, VISION_DEFAULTS, k) for k in VISION_DEFAULTS if k != "layer_norm_eps"}
    tokens = {k: get(raw, IMAGE_TOKEN_DEFAULTS, k, k.replace("_index", "_id")) for k in IMAGE_TOKEN_DEFAULTS}
    config = VisionConfig(
        **sizes,
        layer_norm_eps=_number(
            vision_raw.get("layer_norm_eps", VISION_DEFAULTS["layer_norm_eps"]), "layer_norm_eps", where_vision
        ),
        tokens_per_image=tokens["mm_tokens_per_image"],
        image_token_id=tokens["image_token_index"],
        boi_token_id=tokens["boi_token_index"],
        eoi_token_id=tokens["eoi_token_index"],
    )
    side = math.isqrt(config.tokens_per_image)
    if side * side != config.tokens_per_image or config.patches_per_side % side:
        raise Gemma3Error(
            f"{where}: mm_tokens_per_image {config.tokens_per_image} must be a square whose side divides "
            f"image_size / patch_size = {config.patches_per_side}"
        )
    return config


def parse_text_config(raw: dict, where: str, fill_defaults: bool, top: dict) -> TextConfig:
    if not fill_defaults:
        missing = [k for k in REQUIRED_TEXT_KEYS if k not in raw]
        if missing:
            raise Gemma3Error(f"{where}: missing required key(s) {', '.join(missing)}")
    get = _getter(raw, where)
    if get("attn_logit_softcapping") is not None:
        raise Gemma3Error(f"{where}: attn_logit_softcapping is not used by Gemma 3 and is not supported")
    bidirectional = raw.get("use_bidirectional_attention") or False
    if not isinstance(bidirectional, bool):
        raise Gemma3Error(
            f"{where}: use_bidirectional_attention must be true or false, got {short_repr(bidirectional)}"
        )
    if get("hidden_activation") not in SUPPORTED_ACTIVATIONS:
        raise Gemma3Error(f"{where}: hidden_activation {get('hidden_activation')!r} is not Gemma 3's GELU-tanh")
    num_layers = _size(get("num_hidden_layers"), "num_hidden_layers", where, MAX_LAYERS)
    rope_full, rope_sliding = _rope(raw, where)
    config = TextConfig(
        hidden_size=get("hidden_size", int),
        intermediate_size=get("intermediate_size", int),
        num_hidden_layers=num_layers,
        num_attention_heads=get("num_attention_heads", int),
        num_key_value_heads=get("num_key_value_heads", int),
        head_dim=get("head_dim", int),
        vocab_size=get("vocab_size", int),
        rms_norm_eps=get("rms_norm_eps", float),
        query_pre_attn_scalar=get("query_pre_attn_scalar", float),
        sliding_window=get("sliding_window", int),
        layer_types=_layer_types(raw, num_layers, where),
        rope_full=rope_full,
        rope_sliding=rope_sliding,
        max_position_embeddings=get("max_position_embeddings", int),
        final_logit_softcapping=get("final_logit_softcapping", float, optional=True),
        tie_word_embeddings=bool(top.get("tie_word_embeddings", get("tie_word_embeddings"))),
        weight_dtype=_weight_dtype(raw, top),
        bidirectional=bidirectional,
    )
    for heads in ("num_attention_heads", "num_key_value_heads"):
        if getattr(config, heads) * config.head_dim > MAX_SIZE:
            raise Gemma3Error(
                f"{where}: {heads} × head_dim is {getattr(config, heads) * config.head_dim}, above {MAX_SIZE}"
            )
    return config


def _getter(raw: dict, where: str):
    def get(key, kind=None, optional=False):
        """raw[key] or its default; kind int: a size, float: a positive number (or null where optional)."""
        value = raw.get(key, TEXT_DEFAULTS.get(key))
        if kind is int:
            return _size(value, key, where)
        if kind is float and not (optional and value is None):
            return _number(value, key, where)
        return value

    return get


def _layer_types(raw: dict, num_layers: int, where: str) -> tuple[str, ...]:
    types = raw.get("layer_types")
    if types is not None:
        _check_layer_types(types, num_layers, where)
        return tuple(types)
    key = "sliding_window_pattern" if "sliding_window_pattern" in raw else "_sliding_window_pattern"
    pattern = raw.get(key, DEFAULT_SLIDING_PATTERN)
    if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
        raise Gemma3Error(
            f"{where}: {key} must be a positive integer (every n-th layer uses full attention; "
            f"Gemma 3 uses {DEFAULT_SLIDING_PATTERN}), got {pattern!r}: fix it or remove the key"
        )
    return layer_types_for_pattern(pattern, num_layers)


def _check_layer_types(types, num_layers: int, where: str) -> None:
    expected = f"{where}: layer_types must list {num_layers} entries of {FULL!r} or {SLIDING!r} (one per layer)"
    if not isinstance(types, list):
        raise Gemma3Error(f"{expected}, got {type(types).__name__} {types!r}: fix it or remove the key")
    if len(types) != num_layers:
        raise Gemma3Error(f"{expected}, got {len(types)}: fix it or remove the key")
    unknown = [t for t in types if t not in (FULL, SLIDING)]
    if unknown:
        raise Gemma3Error(f"{expected}, got unknown entry {unknown[0]!r}: fix it or remove the key")


def layer_types_for_pattern(pattern: int, num_layers: int) -> tuple[str, ...]:
    """Legacy `sliding_window_pattern`: every pattern-th layer is full, the others sliding."""
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


def _rope(raw: dict, where: str) -> tuple[RopeConfig, RopeConfig]:
    """Full- and sliding-layer RoPE from `rope_parameters` (transformers 5) or the legacy keys."""
    full = {"rope_type": "default", "rope_theta": raw.get("rope_theta", TEXT_DEFAULTS["rope_theta"])}
    sliding = {
        "rope_type": "default",
        "rope_theta": raw.get("rope_local_base_freq", TEXT_DEFAULTS["rope_local_base_freq"]),
    }
    full.update(_section(raw, "rope_scaling", where))
    params = _section(raw, "rope_parameters", where)
    if FULL in params or SLIDING in params:
        full.update(_section(params, FULL, where + " rope_parameters"))
        sliding.update(_section(params, SLIDING, where + " rope_parameters"))
    else:
        full.update(params)  # a flat dict describes the global (full-attention) RoPE
    return _rope_config(full, where + " (full-attention RoPE)"), _rope_config(sliding, where + " (sliding RoPE)")


def _rope_config(params: dict, where: str) -> RopeConfig:
    kind = params.get("rope_type", params.get("type", "default"))
    theta = _number(params.get("rope_theta"), "rope_theta", where)
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, factor=_number(params.get("factor"), "factor", where))
    raise Gemma3Error(f"{where}: rope_type {short_repr(kind)} is not supported (Gemma 3 uses 'default' and 'linear')")


def _weight_dtype(raw: dict, top: dict) -> str:
    dtype = top.get("dtype") or top.get("torch_dtype") or raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    return dtype if dtype in FLOAT_DTYPES else "bfloat16"
