"""The training forward pass (optionally checkpointed layer by layer) and the masked next-token loss."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


@dataclass
class Batch:
    """Token ids [B, L] right-padded, loss weights [B, L] (1 where a token is predicted and counts), and the
    pixels [N, H, W, 3] of the batch's images in row order (None without images)."""

    ids: mx.array
    weights: mx.array
    pixel_values: mx.array | None = None


def checkpointed(layer: nn.Module, h: mx.array, mask: mx.array) -> mx.array:
    """layer(h, mask), its activations recomputed in the backward pass instead of kept."""

    def run(parameters, h):
        layer.update(parameters)
        return layer(h, mask)

    return mx.checkpoint(run)(layer.trainable_parameters(), h)


def training_logits(model: nn.Module, ids: mx.array, pixel_values: mx.array | None, grad_checkpoint: bool) -> mx.array:
    """The model's logits for a batch of whole sequences (no cache), as model(ids, pixel_values) computes them."""
    features = None if pixel_values is None else model.encode_images(pixel_values)
    h, blocks = model.input_embeddings(ids, features)
    language_model = getattr(model, "language_model", model)
    text = language_model.model
    masks = text.masks(h.shape[1], None, blocks)
    for layer in text.layers:
        mask = masks[layer.is_sliding]
        h = checkpointed(layer, h, mask) if grad_checkpoint else layer(h, mask)
    return language_model.logits(text.norm(h))


def token_losses(logits: mx.array, batch: Batch) -> tuple[mx.array, mx.array]:
    """(sum of the cross-entropies of the counted tokens, how many tokens count)."""
    targets, weights = batch.ids[:, 1:], batch.weights[:, 1:]
    ce = nn.losses.cross_entropy(logits[:, :-1].astype(mx.float32), targets, reduction="none")
    return (ce * weights).sum(), weights.sum()


def default_loss(model: nn.Module, batch: Batch, grad_checkpoint: bool = False) -> tuple[mx.array, mx.array]:
    """(mean cross-entropy over the counted tokens, their count): mlx-lm's loss, with a weight per token."""
    total, count = token_losses(training_logits(model, batch.ids, batch.pixel_values, grad_checkpoint), batch)
    return total / mx.maximum(count, 1), count
