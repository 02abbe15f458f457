"""SigLIP vision tower and Gemma 3's multimodal projector (channels-last; attribute names equal checkpoint keys).

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .attention import attention
from .config import VisionConfig
from .text import RMSNorm


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.scale = (cfg.hidden_size // cfg.num_attention_heads) ** -0.5
        dims = cfg.hidden_size
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        B, N, _ = x.shape
        q, k, v = (
            p(x).reshape(B, N, self.n_heads, -1).transpose(0, 2, 1, 3) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = attention(q, k, v, self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, N, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu_approx(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class Embeddings(nn.Module):
    """Non-overlapping patches (a strided conv), row-major, plus a learned position per patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=True
        )
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2, cfg.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        patches = self.patch_embedding(pixels)
        B, rows, cols, D = patches.shape
        return patches.reshape(B, rows * cols, D) + self.position_embedding.weight


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.post_layernorm(self.encoder(self.embeddings(pixels)))


class VisionTower(nn.Module):
    """Checkpoint prefix `vision_tower.vision_model.`; pixels [N, H, W, 3] → patch features [N, patches, hidden]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = VisionModel(cfg)

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.vision_model(pixels)


class Projector(nn.Module):
    """Patch grid → average-pooled tokens → RMSNorm → text width (`multi_modal_projector.`)."""

    def __init__(self, cfg: VisionConfig, text_hidden: int):
        super().__init__()
        self.mm_input_projection_weight = mx.zeros((cfg.hidden_size, text_hidden))
        self.mm_soft_emb_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.side, self.pool = cfg.patches_per_side, cfg.pool

    def __call__(self, patches: mx.array) -> mx.array:
        B, _, D = patches.shape
        tokens = self.side // self.pool
        grid = patches.reshape(B, tokens, self.pool, tokens, self.pool, D)
        pooled = grid.astype(mx.float32).mean(axis=(2, 4)).astype(patches.dtype).reshape(B, tokens * tokens, D)
        return self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight
