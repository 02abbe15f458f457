"""What a model needs in memory: its weights, its KV cache at T tokens, and one prefill chunk's attention.

KV (docs/model.md §9): 2 · kv_heads · head_dim · bytes per value for each token a layer holds; a full layer holds
every token (or `max_kv_size`), a sliding layer at most its window. One prefill chunk of L queries against N keys
adds a boolean mask [L, N] for the full layers, and, on the CPU's composed attention (model/attention.py), two
score matrices [heads, L, N] in the compute dtype at its peak: the k·qᵀ product and its row-major copy, which the
softmax reads. MLX's fused kernel (Metal) never materialises the scores. Everything else a chunk holds is the
same at any N (see docs/long-context.md).

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import TextConfig
from .quantize import DEFAULT_GROUP_SIZE

SCORE_COPIES = 2  # score matrices alive at once in the composed attention: the k·qᵀ product and its transpose


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (a deferred vision tower counted as it will be once read)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def kv_value_bytes(dtype: mx.Dtype, kv_bits: int | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> float:
    """Bytes per cached key or value element: the compute dtype's size, or bits/8 plus a scale and a bias (in the
    compute dtype) per group when the cache is quantized."""
    return dtype.size if kv_bits is None else kv_bits / 8 + 2 * dtype.size / group_size


def layer_counts(cfg: TextConfig) -> tuple[int, int]:
    """(full layers, sliding layers)."""
    sliding = sum(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))
    return cfg.num_hidden_layers - sliding, sliding


def kv_bytes_by_kind(cfg: TextConfig, tokens: int, value_bytes: float, max_kv_size: int | None = None):
    """The formula: (full layers', sliding layers') KV bytes of one sequence of `tokens` tokens, every layer bounded
    by `max_kv_size` if given."""
    full, sliding = layer_counts(cfg)
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * value_bytes
    bound = tokens if max_kv_size is None else min(tokens, max_kv_size)
    return int(per_token * full * bound), int(per_token * sliding * min(bound, cfg.sliding_window))


def kv_bytes(cfg: TextConfig, tokens: int, value_bytes: float, max_kv_size: int | None = None) -> int:
    return sum(kv_bytes_by_kind(cfg, tokens, value_bytes, max_kv_size))


def fitting_kv_size(cfg: TextConfig, budget: float, value_bytes: float) -> int:
    """The largest max_kv_size whose KV fits in `budget` bytes (0 if even the sliding layers' windows do not)."""
    full, sliding = layer_counts(cfg)
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * value_bytes
    windows = sliding * cfg.sliding_window * per_token
    if full == 0:
        return cfg.max_position_embeddings if windows <= budget else 0
    return max(int((budget - windows) // (full * per_token)), 0)


def attention_bytes(cfg: TextConfig, chunk: int, keys: int, dtype: mx.Dtype, composed: bool) -> int:
    """The transient bytes of one full layer's attention for `chunk` queries against `keys` keys: the boolean
    mask, plus the composed path's score matrices (see the module docstring)."""
    mask = chunk * keys
    scores = SCORE_COPIES * cfg.num_attention_heads * chunk * keys * dtype.size if composed else 0
    return mask + scores
