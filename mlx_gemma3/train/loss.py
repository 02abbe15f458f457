"""The training forward pass (optionally checkpointed layer by layer) and the masked next-token loss."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

__all__ = ["Batch", "default_loss"]


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


def final_hidden(model: nn.Module, ids: mx.array, pixel_values: mx.array | None, grad_checkpoint: bool) -> mx.array:
    """The normed last hidden states [B, L, D] of a batch of whole sequences (no cache): the head's input."""
    features = None if pixel_values is None else model.encode_images(pixel_values)
    h, blocks = model.input_embeddings(ids, features)
    text = language_model_of(model).model
    masks = text.masks(h.shape[1], None, blocks)
    for layer in text.layers:
        mask = masks[layer.is_sliding]
        h = checkpointed(layer, h, mask) if grad_checkpoint else layer(h, mask)
    return text.norm(h)


def language_model_of(model: nn.Module) -> nn.Module:
    return getattr(model, "language_model", model)


def training_logits(model: nn.Module, ids: mx.array, pixel_values: mx.array | None, grad_checkpoint: bool) -> mx.array:
    """The model's logits for a batch of whole sequences (no cache), as model(ids, pixel_values) computes them."""
    return language_model_of(model).logits(final_hidden(model, ids, pixel_values, grad_checkpoint))


def counted_positions(weights: mx.array) -> mx.array:
    """Flat indices into [B, L - 1] of the predictions that count (weight ≠ 0); the weights are data, known
    before the graph runs."""
    flat = np.asarray(weights[:, 1:].astype(mx.float32)).reshape(-1)
    return mx.array(np.flatnonzero(flat).astype(np.int32))


def token_losses(model: nn.Module, batch: Batch, grad_checkpoint: bool = False) -> tuple[mx.array, mx.array]:
    """(sum of the cross-entropies of the counted tokens, their summed weights). The vocabulary head (262k
    rows) runs only at the counted positions: the loss and its gradients equal the full-sequence sum's, at a
    fraction of its cost when a prompt is masked."""
    h = final_hidden(model, batch.ids, batch.pixel_values, grad_checkpoint)[:, :-1]
    where = counted_positions(batch.weights)
    h = h.reshape(-1, h.shape[-1])[where]
    targets = batch.ids[:, 1:].reshape(-1)[where]
    weights = batch.weights[:, 1:].reshape(-1)[where]
    logits = language_model_of(model).logits(h).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")
    return (ce * weights).sum(), batch.weights[:, 1:].sum()


def default_loss(model: nn.Module, batch: Batch, grad_checkpoint: bool = False) -> tuple[mx.array, mx.array]:
    """(mean cross-entropy over the counted tokens, their count): mlx-lm's loss, with a weight per token."""
    total, count = token_losses(model, batch, grad_checkpoint)
    return total / mx.maximum(count, 1), count
