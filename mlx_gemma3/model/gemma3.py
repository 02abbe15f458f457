"""Gemma 3 with images: image features replace the image tokens' embeddings; each image attends to itself both ways.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import Gemma3Error
from .cache import REWIND
from .config import ModelConfig
from .quantize import DEFAULT_GROUP_SIZE
from .text import Gemma3TextLM
from .vision import Projector, VisionTower


class Gemma3(nn.Module):
    """Gemma3ForConditionalGeneration: keys `language_model.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = Gemma3TextLM(config)
        self.vision_tower = VisionTower(config.vision)
        self.multi_modal_projector = Projector(config.vision, config.text.hidden_size)
        self._vision_loader = None
        self._vision_lock = threading.Lock()

    def defer_vision(self, loader) -> None:
        """Read the vision weights with `loader()` when the first image is encoded (in whichever thread)."""
        self._vision_loader = loader

    @property
    def vision_deferred(self) -> bool:
        """Whether the vision tower still holds placeholders, its weights to be read when the first image comes."""
        return self._vision_loader is not None

    def _load_vision(self) -> None:
        with self._vision_lock:
            if self._vision_loader is not None:
                self.load_weights(list(self._vision_loader().items()), strict=False)
                mx.eval(self.vision_tower.parameters(), self.multi_modal_projector.parameters())
                self._vision_loader = None

    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        cache=None,
        image_features: mx.array | None = None,
    ) -> mx.array:
        """Logits for `input_ids` [B, L]. Images come as `pixel_values` [N, H, W, 3] (channels-last) or as
        `image_features` already encoded; their tokens must all be in this call."""
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        h, blocks = self.input_embeddings(input_ids, image_features)
        return self.language_model.logits(self.language_model.model(h, cache, blocks))

    def input_embeddings(self, input_ids: mx.array, image_features: mx.array | None = None):
        """(embeddings [B, L, hidden] with the image features spliced in, image blocks [B, L] or None)."""
        text, image_token = self.language_model.model, self.config.vision.image_token_id
        h = text.embed(mx.where(input_ids == image_token, 0, input_ids))  # the image token may lie past the vocab
        if image_features is None:
            return h, None
        ids = np.array(input_ids)
        return self.splice(ids, h, image_features), mx.array(image_blocks(ids, image_token))

    def encode_images(self, pixel_values: mx.array) -> mx.array:
        """Pixels [N, H, W, 3] → image features [N, tokens_per_image, text hidden]."""
        self._load_vision()
        dtype = self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype
        return self.multi_modal_projector(self.vision_tower(pixel_values.astype(dtype)))

    def splice(self, ids: np.ndarray, h: mx.array, features: mx.array) -> mx.array:
        """Put the image features, in order and unscaled, where the image tokens are."""
        positions = np.flatnonzero(ids.reshape(-1) == self.config.vision.image_token_id)
        features = features.reshape(-1, h.shape[-1])
        if positions.size != features.shape[0]:
            per_image = self.config.vision.tokens_per_image
            raise Gemma3Error(
                f"the prompt has {positions.size} image tokens but {features.shape[0] // per_image} image(s) give "
                f"{features.shape[0]} features ({per_image} each): expand each image placeholder exactly once"
            )
        flat = h.reshape(-1, h.shape[-1])
        flat[mx.array(positions)] = features.astype(h.dtype)
        return flat.reshape(h.shape)

    def make_cache(
        self,
        kv_bits: int | None = None,
        kv_group_size: int = DEFAULT_GROUP_SIZE,
        max_kv_size: int | None = None,
        rewind: int = REWIND,
    ) -> list:
        return self.language_model.make_cache(kv_bits, kv_group_size, max_kv_size, rewind)

    @property
    def layers(self):
        return self.language_model.layers


def image_blocks(ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """[B, L]: for each token, the index of the run of image tokens it is in (−1 for other tokens)."""
    is_image = ids == image_token_id
    starts = is_image & ~np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
    return np.where(is_image, np.cumsum(starts, axis=1) - 1, -1).astype(np.int32)
