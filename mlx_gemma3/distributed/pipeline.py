"""Pipeline parallel: contiguous runs of decoder layers per rank, hidden states passed on with send/recv.

Rank 0 holds the embedding (also the tied output head) and the vision tower; the last rank the final norm. The
final hidden state and the logits reach every rank through all_sum (the others add zeros), so every rank runs the
same generation loop and samples the same token.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import Gemma3Error

TIED_HEAD_ONLY = "distributed loading needs the output head tied to the embedding, as every Gemma 3 checkpoint has it"


def stage_bounds(layer_bytes: list[int], head_bytes: int, ranks: int) -> list[tuple[int, int]]:
    """(first layer, one past the last) for each rank: contiguous runs holding about the same bytes, rank 0's
    share counting the embedding (`head_bytes`); every rank gets at least one layer."""
    if len(layer_bytes) < ranks:
        raise Gemma3Error(
            f"pipeline mode splits {len(layer_bytes)} decoder layers across {ranks} ranks: use at most "
            f"{len(layer_bytes)} ranks"
        )
    total = head_bytes + sum(layer_bytes)
    bounds, start, held = [], 0, head_bytes
    for rank in range(ranks):
        end = start + 1
        held += layer_bytes[start]
        target = total * (rank + 1) / ranks
        while end < len(layer_bytes) - (ranks - rank - 1) and held + layer_bytes[end] / 2 <= target:
            held += layer_bytes[end]
            end += 1
        if rank == ranks - 1:
            end = len(layer_bytes)
        bounds.append((start, end))
        start = end
    return bounds


def module_bytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def stage_keys(keys, prefix: str, start: int, end: int, rank: int, ranks: int) -> dict[str, str]:
    """Checkpoint key → this stage's key for the tensors the stage holds (its layers renumbered from 0)."""
    held = {}
    layers = f"{prefix}layers."
    for key in keys:
        if key.startswith(layers):
            index, rest = key[len(layers) :].split(".", 1)
            if start <= int(index) < end:
                held[key] = f"{layers}{int(index) - start}.{rest}"
        elif key.startswith(f"{prefix}embed_tokens."):
            if rank == 0:
                held[key] = key
        elif key.startswith(f"{prefix}norm."):
            if rank == ranks - 1:
                held[key] = key
        elif rank == 0:  # the vision tower and projector
            held[key] = key
    return held


def keep_stage_layers(text: nn.Module, start: int, end: int) -> None:
    text.layers = text.layers[start:end]


def join_pipeline(model: nn.Module, text: nn.Module, dtype: mx.Dtype, group: mx.distributed.Group) -> None:
    """Wrap this stage's first and last layers, the final norm and the head so that the stages exchange hidden
    states and every rank gets the logits (the weights are already loaded)."""
    rank, ranks = group.rank(), group.size()
    if rank > 0:
        text.layers[0] = ReceiveFirst(text.layers[0], rank - 1, group)
        text.embed_tokens = RemoteEmbedding(text.config, dtype, group)
    else:
        text.embed_tokens = SharedHeadEmbedding(text.embed_tokens, group)
    if rank < ranks - 1:
        text.layers[-1] = SendLast(text.layers[-1], rank + 1, group)
    text.norm = SharedFinalNorm(text.norm if rank == ranks - 1 else None, group)
    if rank > 0 and hasattr(model, "multi_modal_projector"):
        model.multi_modal_projector = NoImageFeatures(model.config.vision.tokens_per_image, text.config.hidden_size)


class ReceiveFirst(nn.Module):
    """The stage's first layer, fed by the hidden state the previous stage sends."""

    def __init__(self, layer: nn.Module, source: int, group):
        super().__init__()
        self.layer, self.source, self.group = layer, source, group
        self.is_sliding = layer.is_sliding

    def __call__(self, h: mx.array, mask, cache=None, rotation=None) -> mx.array:
        return self.layer(mx.distributed.recv_like(h, self.source, group=self.group), mask, cache, rotation)


class SendLast(nn.Module):
    """The stage's last layer; its output goes to the next stage at once (a prefill chunk evaluates only the
    caches, which do not depend on the send)."""

    def __init__(self, layer: nn.Module, destination: int, group):
        super().__init__()
        self.layer, self.destination, self.group = layer, destination, group
        self.is_sliding = layer.is_sliding

    def __call__(self, h: mx.array, mask, cache=None, rotation=None) -> mx.array:
        h = self.layer(h, mask, cache, rotation)
        mx.eval(mx.distributed.send(h, self.destination, group=self.group))
        return h


class SharedFinalNorm(nn.Module):
    """The final norm on the last stage; every rank gets its output (the others add zeros)."""

    def __init__(self, norm: nn.Module | None, group):
        super().__init__()
        self.norm, self.group = norm, group

    def __call__(self, h: mx.array) -> mx.array:
        out = self.norm(h) if self.norm is not None else mx.depends(mx.zeros_like(h), h)
        return mx.distributed.all_sum(out, group=self.group)


class SharedHeadEmbedding(nn.Module):
    """Rank 0's embedding: looks up the prompt's tokens and, as the tied head, gives the logits to every rank."""

    def __init__(self, embedding: nn.Module, group):
        super().__init__()
        self.embedding, self.group = embedding, group

    def __call__(self, ids: mx.array) -> mx.array:
        return self.embedding(ids)

    def as_linear(self, h: mx.array) -> mx.array:
        return mx.distributed.all_sum(self.embedding.as_linear(h), group=self.group)


class RemoteEmbedding(nn.Module):
    """The embedding's place on the other ranks: no weights; the logits come from rank 0."""

    def __init__(self, cfg, dtype: mx.Dtype, group):
        super().__init__()
        self.vocab_size, self.hidden_size, self.dtype, self.group = cfg.vocab_size, cfg.hidden_size, dtype, group

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.zeros((*ids.shape, self.hidden_size), self.dtype)

    def as_linear(self, h: mx.array) -> mx.array:
        zeros = mx.depends(mx.zeros((*h.shape[:-1], self.vocab_size), h.dtype), h)  # after the norm's all_sum
        return mx.distributed.all_sum(zeros, group=self.group)


class NoImageFeatures(nn.Module):
    """The projector's place after stage 0: the image features matter only where the embeddings are made."""

    def __init__(self, tokens_per_image: int, hidden: int):
        super().__init__()
        self.tokens_per_image, self.hidden = tokens_per_image, hidden

    def __call__(self, vision_out: mx.array) -> mx.array:
        return mx.zeros((vision_out.shape[0], self.tokens_per_image, self.hidden))
