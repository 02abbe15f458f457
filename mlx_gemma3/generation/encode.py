"""embed(): texts in, EmbeddingGemma vectors out — prompts, batches of similar lengths, Matryoshka truncation.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import Gemma3Error
from ..model.embedding_model import Gemma3Embedding, unit_rows
from ..processing.embedding_tasks import embedding_ids
from ..processing.tokenizer import PAD_ID, Tokenizer
from .thread_streams import generation_stream

BATCH_TOKENS = 4096  # padded tokens per forward pass: bounds the attention scores held at once
MATRYOSHKA = (768, 512, 256, 128)  # the widths EmbeddingGemma was trained to be truncated to


@dataclass(frozen=True)
class EmbeddingModel:
    """What mlx_gemma3.load_embedding returns: the network, its tokenizer and whether that adds <bos>/<eos>."""

    model: Gemma3Embedding
    tokenizer: Tokenizer
    ends: tuple[bool, bool]

    @property
    def dimensions(self) -> int:
        """The width of the embeddings (before any truncation)."""
        return self.model.sentence.dimensions or self.model.config.text.hidden_size

    @property
    def tasks(self) -> list[str]:
        """The task names `embed` accepts (the model's prompts)."""
        return list(self.model.sentence.prompts)


@dataclass(frozen=True)
class Embeddings:
    """The vectors [N, dimensions] (float32) and the tokens the texts took (prompts and <bos>/<eos> included)."""

    vectors: np.ndarray
    tokens: int


def embed(
    model: EmbeddingModel,
    texts,
    task: str | None = None,
    dimensions: int | None = None,
    title: str | Sequence[str | None] | None = None,
) -> np.ndarray:
    """EmbeddingGemma vectors for `texts` (a string or a list of them), one row each, float32 (unit length when the
    model normalises, as EmbeddingGemma does).

    `task`: a prompt name of the model — "query" and "document" for retrieval, and for symmetric tasks
    "classification", "clustering", "sts" (sentence similarity) and the others `model.tasks` lists; None: the
    model's default prompt (EmbeddingGemma has none). `title`: with task="document", the document's title (one
    for all texts, or one per text). `dimensions`: keep the first so many values and re-normalise (Matryoshka:
    EmbeddingGemma is trained for 768, 512, 256 and 128)."""
    single = isinstance(texts, str)
    result = embed_all(model, [texts] if single else texts, task, dimensions, title)
    return result.vectors[0] if single else result.vectors


def embed_all(model: EmbeddingModel, inputs, task=None, dimensions=None, title=None) -> Embeddings:
    """`embed` for a list of inputs — texts, or token-id lists standing for texts — with the token count."""
    check_model(model)
    width = checked_dimensions(dimensions, model.dimensions)
    count = len(inputs) if isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)) else 0
    titles = [title] * count if title is None or isinstance(title, str) else list(title)
    ids = embedding_ids(model.tokenizer, model.ends, model.model.sentence, inputs, task, titles)
    vectors = np.zeros((len(ids), model.dimensions), np.float32)
    with mx.stream(generation_stream()):
        for rows in batches([len(i) for i in ids]):
            vectors[rows] = np.array(encode_batch(model.model, [ids[r] for r in rows]))
        if width != model.dimensions:
            vectors = truncated(vectors, width, model.model.sentence.normalize)
    return Embeddings(vectors, sum(len(i) for i in ids))


def check_model(model) -> None:
    if not isinstance(model, EmbeddingModel):
        raise Gemma3Error(
            f"embed needs the model mlx_gemma3.load_embedding() returns (an EmbeddingGemma folder), got "
            f"{type(model).__name__}"
        )


def checked_dimensions(dimensions, full: int) -> int:
    if dimensions is None:
        return full
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= full:
        raise Gemma3Error(
            f"dimensions must be an integer from 1 to {full}, got {dimensions!r} "
            f"(EmbeddingGemma is trained for {', '.join(map(str, MATRYOSHKA))})"
        )
    return dimensions


def batches(lengths: list[int], budget: int = BATCH_TOKENS) -> list[list[int]]:
    """Input indices grouped longest first, each group padded to its longest within `budget` tokens (at least one
    input a group), so texts of similar lengths share a forward pass."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def encode_batch(model: Gemma3Embedding, rows: list[list[int]]) -> mx.array:
    """Embeddings of token rows of different lengths in one forward pass (right padding, masked out exactly)."""
    longest = max(len(r) for r in rows)
    padded = mx.array([r + [PAD_ID] * (longest - len(r)) for r in rows])
    out = model(padded, mx.array([len(r) for r in rows]))
    mx.eval(out)
    return out


def truncated(vectors: np.ndarray, width: int, normalize: bool) -> np.ndarray:
    """The first `width` values of each row, re-normalised to unit length when the model normalises."""
    kept = mx.array(vectors[:, :width])
    return np.array(unit_rows(kept) if normalize else kept)
