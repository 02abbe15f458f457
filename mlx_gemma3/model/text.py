"""Gemma 3 text tower: RMSNorm, attention, MLP, decoder layers and the tied-head causal LM.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..errors import Gemma3Error
from .attention import attention
from .cache import REWIND, attention_mask, make_cache
from .config import ModelConfig, TextConfig
from .quantize import DEFAULT_GROUP_SIZE
from .rope import RoPE, Rotation, rotate

TEXT_ONLY = "this model reads text only: images need a Gemma 3 4B, 12B or 27B (multimodal) model"

FLOAT16_MAX = 65504.0


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32, weight stored zero-centred and applied as (1 + w)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        scale = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.scale = cfg.query_pre_attn_scalar**-0.5
        hidden, head_dim = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(hidden, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
        self._rope = RoPE(head_dim, cfg.rope(layer))

    def __call__(self, x: mx.array, mask: mx.array, cache=None, rotation: Rotation | None = None) -> mx.array:
        """`rotation`: this call's RoPE tables (TextModel makes them once per layer type); None: made here."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if rotation is None:
            rotation = self._rope.rotation(0 if cache is None else cache.offset, L, q.dtype)
        q, k = rotate(q, rotation), rotate(k, rotation)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.is_sliding = cfg.is_sliding(layer)
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def __call__(self, h: mx.array, mask: mx.array, cache=None, rotation: Rotation | None = None) -> mx.array:
        attn = self.self_attn(self.input_layernorm(h), mask, cache, rotation)
        h = residual_add(h, self.post_attention_layernorm(attn))
        return residual_add(h, self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))))


def residual_add(h: mx.array, x: mx.array) -> mx.array:
    """Add a branch to the residual stream; in float16 keep it finite (Gemma's stream overflows fp16)."""
    if h.dtype == mx.float16:
        return mx.clip(h + x, -FLOAT16_MAX, FLOAT16_MAX)
    return h + x


class TextModel(nn.Module):
    """Embedding, decoder layers and final norm (checkpoint prefix `model.`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._full_rope, self._sliding_rope = RoPE(cfg.head_dim, cfg.rope_full), RoPE(cfg.head_dim, cfg.rope_sliding)

    def embed(self, input_ids: mx.array) -> mx.array:
        h = self.embed_tokens(input_ids)
        return h * mx.array(self.config.embed_scale, dtype=h.dtype)

    def __call__(self, h: mx.array, cache=None, image_blocks: mx.array | None = None) -> mx.array:
        """Run the decoder over embeddings `h` [B, L, hidden]; returns normed hidden states.

        `image_blocks` [B, L]: the image each token belongs to (−1 for text); tokens of one image
        attend to each other both ways."""
        return self.run(h, self.masks(h.shape[1], cache, image_blocks), cache)

    def run(self, h: mx.array, masks: dict[bool, mx.array], cache=None) -> mx.array:
        """The decoder layers over `h`, each with the mask of its kind (`masks` keyed by is_sliding), then the
        final norm."""
        rotations = self.rotations(h.shape[1], cache, h.dtype)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            h = layer(h, masks[layer.is_sliding], layer_cache, rotations[layer.is_sliding])
        return self.norm(h)

    def rotations(self, length: int, cache, dtype: mx.Dtype) -> dict[bool, Rotation]:
        """One set of RoPE tables per layer kind, keyed by `is_sliding`: every layer of a kind turns alike."""
        offset = 0 if cache is None else cache[0].offset
        ropes = {False: self._full_rope, True: self._sliding_rope}
        return {sliding: rope.rotation(offset, length, dtype) for sliding, rope in ropes.items()}

    def masks(self, length: int, cache, image_blocks) -> dict[bool, mx.array]:
        """One mask per layer kind, keyed by `is_sliding`; caches build their own."""
        kinds = {layer.is_sliding: i for i, layer in enumerate(self.layers)}
        if cache is None:
            window = self.config.sliding_window
            return {s: attention_mask(length, 0, window if s else None, blocks=image_blocks) for s in kinds}
        return {sliding: cache[i].make_mask(length, image_blocks) for sliding, i in kinds.items()}


class Gemma3TextLM(nn.Module):
    """Gemma3ForCausalLM: `logits = model(input_ids)`; checkpoint keys `model.*` (+ `lm_head.*` if untied)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config.text)
        if not config.text.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def __call__(self, input_ids: mx.array, cache=None) -> mx.array:
        return self.logits(self.model(self.model.embed(input_ids), cache))

    def input_embeddings(self, input_ids: mx.array, image_features: mx.array | None = None):
        """(embeddings [B, L, hidden], None): the text model's half of Gemma3.input_embeddings."""
        if image_features is not None:
            raise Gemma3Error(TEXT_ONLY)
        return self.model.embed(input_ids), None

    def logits(self, h: mx.array) -> mx.array:
        if self.config.text.tie_word_embeddings:
            out = self.model.embed_tokens.as_linear(h)
        else:
            out = self.lm_head(h)
        cap = self.config.text.final_logit_softcapping
        return out if cap is None else mx.tanh(out / cap) * cap

    def make_cache(
        self,
        kv_bits: int | None = None,
        kv_group_size: int = DEFAULT_GROUP_SIZE,
        max_kv_size: int | None = None,
        rewind: int = REWIND,
    ) -> list:
        """One cache per layer: a rotating cache of the sliding window for sliding layers, a growing one for full
        layers. `max_kv_size` bounds every layer whose window is larger to that many tokens: the first 4 (attention
        sinks) and the latest max_kv_size − 4, as mlx-lm's RotatingKVCache(max_kv_size, keep=4) holds them (mlx-lm
        0.32.2 itself ignores max_kv_size for Gemma 3: its make_cache keeps full layers growing). `rewind`: tokens
        a wrapped sliding cache can still trim (speculative decoding needs num_draft_tokens + 1)."""
        return make_cache(
            self.model.layers, self.config.text.sliding_window, kv_bits, kv_group_size, max_kv_size, rewind
        )

    @property
    def layers(self):
        return self.model.layers
