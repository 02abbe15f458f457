"""EmbeddingGemma: a bidirectional Gemma 3 text tower, mean pooling, dense projections and L2 normalisation, set up
from the folder's sentence-transformers files (modules.json and the files it names).

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import Gemma3Error
from .config import ModelConfig, short_repr
from .text import TextModel

MODULES_FILE = "modules.json"
PROMPTS_FILE = "config_sentence_transformers.json"
SEQUENCE_FILE = "sentence_bert_config.json"
# sentence-transformers' activation classes (Dense.activation_function) this model can apply.
ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": lambda x: x,
    "torch.nn.modules.activation.Tanh": mx.tanh,
}
IDENTITY = "torch.nn.modules.linear.Identity"
LEGACY_POOLING = {  # sentence-transformers < 6 wrote one boolean per pooling mode
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
NO_LIMIT = 10**7  # tokenizer_config.json's model_max_length above this means "none set" (transformers writes 1e30)
NORM_EPS = 1e-12  # torch.nn.functional.normalize's floor on the norm


@dataclass(frozen=True)
class DenseSpec:
    """One sentence-transformers Dense module: a linear layer and its activation."""

    in_features: int
    out_features: int
    bias: bool
    activation: str = IDENTITY


@dataclass(frozen=True)
class SentenceConfig:
    """How token states become a sentence embedding, and the prompts and length limit that go with the model."""

    dense: tuple[DenseSpec, ...]
    normalize: bool
    max_seq_length: int
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None

    @property
    def dimensions(self) -> int | None:
        """The width of the embedding the dense layers produce (None: the hidden size, when there are none)."""
        return self.dense[-1].out_features if self.dense else None


def is_sentence_folder(folder: str | Path) -> bool:
    return (Path(folder) / MODULES_FILE).is_file()


def read_json(path: Path, what: str = "") -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise Gemma3Error(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Gemma3Error(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, (dict, list)):
        raise Gemma3Error(f"{path}: expected {what or 'a JSON object'}")
    return value


def sentence_modules(folder: Path) -> list[tuple[str, str]]:
    """(kind, sub-folder) of each module modules.json lists, kind being the class name (Transformer, Pooling...)."""
    path = folder / MODULES_FILE
    modules = read_json(path, "a list of modules")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise Gemma3Error(f"{path}: expected a list of {{'path', 'type'}} objects")
    found = []
    for module in modules:
        kind, sub = module.get("type"), module.get("path", "")
        if not isinstance(kind, str) or not isinstance(sub, str) or Path(sub).is_absolute() or ".." in Path(sub).parts:
            raise Gemma3Error(
                f"{path}: a module needs a 'type' and a 'path' inside the folder, got {short_repr(module)}"
            )
        found.append((kind.rpartition(".")[2], sub))
    expected = "Transformer, Pooling, then Dense layers and an optional Normalize"
    kinds = [kind for kind, _ in found]
    if (
        kinds[:2] != ["Transformer", "Pooling"]
        or any(k != "Dense" for k in kinds[2:-1])
        or (len(kinds) > 2 and kinds[-1] not in ("Dense", "Normalize"))
    ):
        raise Gemma3Error(f"{path}: modules {kinds} are not an EmbeddingGemma pipeline ({expected})")
    return found


def transformer_path(folder: Path) -> Path:
    """The folder holding the text tower (config.json, weights): the folder itself or its 0_Transformer."""
    return folder / sentence_modules(folder)[0][1]


def load_sentence_config(folder: str | Path, config: ModelConfig) -> SentenceConfig:
    """The sentence-transformers modules of `folder`, checked against the text tower's `config`."""
    folder = Path(folder)
    modules = sentence_modules(folder)
    check_pooling(folder / modules[1][1] / "config.json")
    dense = tuple(dense_spec(folder / sub / "config.json") for kind, sub in modules[2:] if kind == "Dense")
    width = config.text.hidden_size
    for i, spec in enumerate(dense):
        if spec.in_features != width:
            raise Gemma3Error(
                f"{folder}: dense layer {i + 1} takes {spec.in_features} features but receives {width}: "
                "the modules do not fit together"
            )
        width = spec.out_features
    prompts, default = read_prompts(folder / PROMPTS_FILE)
    return SentenceConfig(
        dense=dense,
        normalize=modules[-1][0] == "Normalize",
        max_seq_length=max_seq_length(folder, modules[0][1], config),
        prompts=prompts,
        default_prompt_name=default,
    )


def check_pooling(path: Path) -> None:
    """Mean pooling over every real token (prompt included) is what EmbeddingGemma uses; refuse anything else."""
    pooling = read_json(path)
    mode = pooling.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in LEGACY_POOLING.items() if pooling.get(key)]
        mode = modes if len(modes) != 1 else modes[0]
    if mode not in ("mean", ["mean"]):
        raise Gemma3Error(f"{path}: pooling {short_repr(mode)} is not supported (only mean pooling)")
    if pooling.get("include_prompt", True) is not True:
        raise Gemma3Error(f"{path}: include_prompt false (pooling without the prompt tokens) is not supported")


def dense_spec(path: Path) -> DenseSpec:
    config = read_json(path)
    sizes = [config.get(k) for k in ("in_features", "out_features")]
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise Gemma3Error(f"{path}: in_features and out_features must be positive integers")
    activation = config.get("activation_function", IDENTITY)
    if activation not in ACTIVATIONS:
        raise Gemma3Error(f"{path}: activation {short_repr(activation)} is not supported ({', '.join(ACTIVATIONS)})")
    if config.get("use_residual", False) or config.get("module_input_name", "sentence_embedding") not in (
        "sentence_embedding",
    ):
        raise Gemma3Error(f"{path}: only a plain dense layer on the sentence embedding is supported")
    return DenseSpec(sizes[0], sizes[1], bool(config.get("bias", True)), activation)


def read_prompts(path: Path) -> tuple[dict[str, str], str | None]:
    """The named prompts and the default prompt name of config_sentence_transformers.json (none without it)."""
    if not path.is_file():
        return {}, None
    config = read_json(path)
    prompts = config.get("prompts") or {}
    default = config.get("default_prompt_name")
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise Gemma3Error(f"{path}: prompts must map names to prompt strings")
    if default is not None and default not in prompts:
        raise Gemma3Error(f"{path}: default_prompt_name {short_repr(default)} is not one of the prompts")
    return prompts, default


def max_seq_length(folder: Path, sub: str, config: ModelConfig) -> int:
    """Tokens kept per text (longer ones are cut, as sentence-transformers does): sentence_bert_config.json's
    max_seq_length, else the tokenizer's model_max_length, else the model's context."""
    context = config.text.max_position_embeddings
    for path, key in ((folder / sub / SEQUENCE_FILE, "max_seq_length"), (folder / "tokenizer_config.json", None)):
        if path.is_file():
            value = read_json(path).get(key or "model_max_length")
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value < NO_LIMIT:
                return min(value, context)
    return context


class Gemma3Embedding(nn.Module):
    """EmbeddingGemma: `model.*` (the text tower), `dense.{i}.*` (sentence-transformers' Dense layers in order)."""

    def __init__(self, config: ModelConfig, sentence: SentenceConfig):
        super().__init__()
        self.config = config
        self.sentence = sentence
        self.model = TextModel(config.text)
        self.dense = [nn.Linear(d.in_features, d.out_features, bias=d.bias) for d in sentence.dense]

    def __call__(self, input_ids: mx.array, lengths: mx.array) -> mx.array:
        """Sentence embeddings [B, D] in float32 for right-padded `input_ids` [B, L] whose row i holds
        `lengths[i]` real tokens; the padding changes nothing in the real rows."""
        length = input_ids.shape[1]
        masks = bidirectional_masks(lengths, length, self.config.text.sliding_window)
        states = self.model.run(self.model.embed(input_ids), masks)
        real = (mx.arange(length)[None, :] < lengths[:, None])[..., None]
        pooled = mx.sum(mx.where(real, states.astype(mx.float32), 0.0), axis=1) / lengths[:, None].astype(mx.float32)
        x = pooled.astype(states.dtype)
        for layer, spec in zip(self.dense, self.sentence.dense):
            x = ACTIVATIONS[spec.activation](layer(x))
        x = x.astype(mx.float32)
        return unit_rows(x) if self.sentence.normalize else x

    @property
    def layers(self):
        return self.model.layers


def bidirectional_masks(lengths: mx.array, length: int, window: int) -> dict[bool, mx.array]:
    """[B, 1, L, L] masks keyed by is_sliding: every real token sees every real token; on sliding layers only
    those at most window // 2 positions away, as transformers masks EmbeddingGemma (its config turns the window W
    into an exclusive bound of W // 2 + 1 on |query − key|). A padding position sees itself, so no row is empty."""
    positions = mx.arange(length)
    real_keys = (positions[None, :] < lengths[:, None])[:, None, None, :]
    own = positions[:, None] == positions[None, :]
    full = real_keys | own
    band = mx.abs(positions[:, None] - positions[None, :]) <= window // 2
    return {False: full, True: full & band}


def unit_rows(x: mx.array) -> mx.array:
    """Each row divided by its L2 norm (at least NORM_EPS), as torch.nn.functional.normalize."""
    norm = mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True))
    return x / mx.maximum(norm, NORM_EPS)
