"""Images against transformers' Gemma3ForConditionalGeneration: vision tower, projector, splicing, image-block masks."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import mlx_gemma3
from conftest import TINY_IMAGE_TOKENS, TINY_VISION, convert, tiny_multimodal_model

BOI, EOI, IMG = (TINY_IMAGE_TOKENS[k] for k in ("boi_token_index", "eoi_token_index", "image_token_index"))
SIZE = TINY_VISION["image_size"]
# float32 rounding through the vision tower reaches 1.2e-4 on logits of magnitude ~60 (3e-6 relative).
TOLERANCE = 2e-4


def prompt_with_images(pieces: list, tokens_per_image: int, seed: int = 0) -> np.ndarray:
    """Token ids for text runs (ints: that many random tokens) and images ("image") in order, BOS first."""
    rng = np.random.RandomState(seed)
    ids = [2]
    for piece in pieces:
        if piece == "image":
            ids += [BOI, *[IMG] * tokens_per_image, EOI]
        else:
            ids += rng.randint(3, 500, size=piece).tolist()
    return np.array([ids])


def reference(model, ids: np.ndarray, pixels: np.ndarray, bidirectional: bool = True) -> np.ndarray:
    """transformers' logits; token_type_ids mark image tokens as the processor does (None: causal only)."""
    token_types = torch.tensor((ids == IMG).astype(np.int64)) if bidirectional else None
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
            token_type_ids=token_types,
        )
    return out.logits.float().numpy()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(our model, transformers model) per (tokens per image, sliding window)."""
    made = {}

    def get(tokens_per_image: int = 4, window: int = 16):
        if (tokens_per_image, window) not in made:
            folder = tmp_path_factory.mktemp("vision")
            hf = tiny_multimodal_model(
                seed=4, mm_tokens_per_image=tokens_per_image, image_tokens=TINY_IMAGE_TOKENS, sliding_window=window
            )
            hf.save_pretrained(folder / "hf")
            model, _ = mlx_gemma3.load(convert(folder / "hf", folder / "mlx"))
            made[tokens_per_image, window] = model, hf
        return made[tokens_per_image, window]

    return get


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).uniform(-1, 1, size=(n, SIZE, SIZE, 3)).astype(np.float32)


CASES = {
    "one image": (4, 16, [5, "image", 7]),
    "two images between text": (4, 16, [3, "image", 6, "image", 4]),
    "image longer than the window": (16, 8, [4, "image", 9]),
    "adjacent images": (4, 16, [2, "image", "image", 30]),
}


@pytest.mark.parametrize("case", CASES)
def test_image_prompts_match_transformers(converted, case):
    tokens_per_image, window, pieces = CASES[case]
    model, hf = converted(tokens_per_image, window)
    ids = prompt_with_images(pieces, tokens_per_image)
    images = pixels(pieces.count("image"))
    expected = reference(hf, ids, images)
    ours = np.array(model(mx.array(ids), pixel_values=mx.array(images)))
    assert np.abs(ours - expected).max() <= TOLERANCE
    causal_only = reference(hf, ids, images, bidirectional=False)
    assert np.abs(causal_only - expected).max() > 1e-2  # the image blocks really change the result


def test_image_features_match_transformers(converted):
    model, hf = converted()
    images = pixels(3, seed=1)
    with torch.no_grad():
        expected = hf.model.get_image_features(torch.tensor(images).permute(0, 3, 1, 2))
    expected = getattr(expected, "pooler_output", expected)
    expected = (expected if isinstance(expected, torch.Tensor) else torch.stack(list(expected))).numpy()
    ours = np.array(model.encode_images(mx.array(images)))
    assert np.abs(ours - expected.reshape(ours.shape)).max() <= 1e-4


def test_chunked_prefill_with_an_image_then_decode(converted):
    model, hf = converted()
    ids = prompt_with_images([20, "image", 25], 4)
    images = pixels(1)
    expected = reference(hf, ids, images)
    start = int(np.flatnonzero(ids[0] == IMG)[0])
    cache = model.make_cache()
    parts = [
        model(mx.array(ids[:, : start - 3]), cache=cache),
        model(mx.array(ids[:, start - 3 : start + 9]), pixel_values=mx.array(images), cache=cache),
        *(model(mx.array(ids[:, i : i + 1]), cache=cache) for i in range(start + 9, ids.shape[1])),
    ]
    ours = np.concatenate([np.array(p) for p in parts], axis=1)
    assert np.abs(ours - expected).max() <= TOLERANCE


def test_image_token_count_mismatch_is_an_error(converted):
    model, _ = converted()
    ids = prompt_with_images([3, "image", 3], 4)
    with pytest.raises(mlx_gemma3.Gemma3Error, match="8 features"):
        model(mx.array(ids), pixel_values=mx.array(pixels(2)))
