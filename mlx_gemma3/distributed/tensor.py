"""Tensor parallel: each rank holds a share of every layer's attention heads and MLP columns (MLX's sharded
linears; one all_sum after the attention and one after the MLP) and a share of the vocabulary's embedding rows,
which is also the tied output head. The vision tower is replicated.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx.utils import tree_map

from ..errors import Gemma3Error

TO_SHARDED = ("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj")
KV = ("self_attn.k_proj", "self_attn.v_proj")
TO_ALL = ("self_attn.o_proj", "mlp.down_proj")


def check_divisible(cfg, ranks: int, quantization: dict | None) -> None:
    """One clear error when the heads, KV heads or MLP columns do not split evenly across the ranks."""
    counts = {
        "attention heads": cfg.num_attention_heads,
        "MLP columns": cfg.intermediate_size,
        "vocabulary rows": cfg.vocab_size,
    }
    for what, count in counts.items():
        if count % ranks:
            raise Gemma3Error(
                f"tensor mode splits the {count} {what} across {ranks} ranks, which does not divide "
                f"evenly: use a number of ranks that divides {count}, or --distributed pipeline"
            )
    kv = cfg.num_key_value_heads
    if kv % ranks and ranks % kv:
        raise Gemma3Error(
            f"tensor mode needs the {kv} key/value heads to split across {ranks} ranks, or {ranks} ranks "
            f"to share them evenly: use a number of ranks that divides or is a multiple of {kv}"
        )
    group_size = (quantization or {}).get("group_size")
    if group_size:
        for what, width in (
            ("attention output", cfg.num_attention_heads * cfg.head_dim),
            ("MLP down projection", cfg.intermediate_size),
        ):
            if (width // ranks) % group_size:
                raise Gemma3Error(
                    f"tensor mode gives each of {ranks} ranks {width // ranks} inputs of the {what}, not "
                    f"a multiple of the quantization group {group_size}: use fewer ranks or pipeline"
                )


def shard_layers(layers: list[nn.Module], group: mx.distributed.Group) -> None:
    """Swap each layer's projections for sharded ones (the weights sliced lazily: evaluate them layer by layer)."""
    ranks = group.size()
    for layer in layers:
        attention = layer.self_attn
        for path in TO_SHARDED:
            swap(layer, path, "all-to-sharded", group)
        for path in TO_ALL:
            swap(layer, path, "sharded-to-all", group)
        if attention.n_kv_heads % ranks == 0:
            for path in KV:
                swap(layer, path, "all-to-sharded", group)
            attention.n_kv_heads //= ranks
        else:  # fewer KV heads than ranks: each rank keeps the one its query heads read
            head = group.rank() * attention.n_kv_heads // ranks
            for projection in (attention.k_proj, attention.v_proj):
                keep_rows(projection, head, attention.n_kv_heads)
            attention.n_kv_heads = 1
        attention.n_heads //= ranks
        layer.update(tree_map(own_buffer, layer.parameters()))


def keep_rows(linear: nn.Module, part: int, parts: int) -> None:
    """Keep one of `parts` equal runs of a linear layer's output rows (float or quantized: every array by rows)."""
    linear.update(tree_map(lambda w: mx.split(w, parts, axis=0)[part], linear.parameters()))


def own_buffer(w: mx.array) -> mx.array:
    """`w` copied into a buffer of its own: a run of rows is a view that would keep the whole source tensor
    resident (mx.contiguous leaves such a view as it is)."""
    return mx.take(w, mx.arange(w.shape[0]), axis=0) if w.ndim else w


def swap(layer: nn.Module, path: str, sharding: str, group) -> None:
    parent_name, name = path.split(".")
    parent = getattr(layer, parent_name)
    setattr(parent, name, shard_linear(getattr(parent, name), sharding, group=group))


class ShardedEmbedding(nn.Module):
    """A share of the embedding's rows (the vocabulary split in N runs): a lookup adds every rank's rows with
    all_sum, and as the tied head each rank's logits for its rows are gathered."""

    def __init__(self, embedding: nn.Module, vocab_size: int, group: mx.distributed.Group):
        super().__init__()
        shard_inplace(embedding, lambda path, weight: 0, group=group)  # weight, scales and biases by rows
        embedding.update(tree_map(own_buffer, embedding.parameters()))
        self.embedding, self.group = embedding, group
        self.rows = vocab_size // group.size()
        self.first = self.rows * group.rank()

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.first
        mine = (local >= 0) & (local < self.rows)
        found = self.embedding(mx.clip(local, 0, self.rows - 1))
        return mx.distributed.all_sum(mx.where(mine[..., None], found, mx.zeros_like(found)), group=self.group)

    def as_linear(self, h: mx.array) -> mx.array:
        mine = mx.moveaxis(self.embedding.as_linear(h), -1, 0)  # all_gather joins along the first axis
        return mx.moveaxis(mx.distributed.all_gather(mine, group=self.group), 0, -1)
