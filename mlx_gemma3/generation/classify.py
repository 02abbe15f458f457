"""ShieldGemma 2 classification: P("Yes", the image violates the policy) against P("No") for each (image, policy).

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import Gemma3Error
from ..model.cache import batch_cache, filter_cache
from ..processing.image import ONE_IMAGE_TYPES, process_images
from ..processing.shield_prompt import policy_definitions, shield_prompt_ids
from .thread_streams import generation_stream

# Gemma 3's "Yes" and "No" tokens, for a config.json that names none (yes_token_index / no_token_index).
YES_TOKEN_ID, NO_TOKEN_ID = 10_784, 3771
IMAGES_PER_BATCH = 4  # images classified together: each brings one batch row per policy


@dataclass(frozen=True)
class PolicyScore:
    """One image against one policy: "Yes" means the image violates it."""

    image: int  # the image's index in the input
    policy: str
    yes_probability: float
    no_probability: float
    yes_logit: float
    no_logit: float


def classify(
    model, processor, images, policies=None, custom_policies=None, images_per_batch: int = IMAGES_PER_BATCH
) -> list[PolicyScore]:
    """Score every image against every policy with a ShieldGemma 2 model; transformers' processor order:
    image 1 × each policy, then image 2 × each policy, …

    `images`: one image or a list (paths, bytes, PIL images or arrays). `policies`: names of the policies to check
    (default: all); `custom_policies`: name → description, added to the built-in dangerous / sexual / violence
    (a built-in name overrides its text). Each image is encoded once; its prompts share everything up to the
    policy text, which is prefilled once per image, then every policy's rest runs as one batch."""
    check_classifier(model)
    if not isinstance(images_per_batch, int) or isinstance(images_per_batch, bool) or images_per_batch < 1:
        raise Gemma3Error(f"images_per_batch must be a positive integer, got {images_per_batch!r}")
    definitions = policy_definitions(policies, custom_policies)
    prompts = [shield_prompt_ids(processor, text) for text in definitions.values()]
    shared = shared_prefix(prompts, model.config.vision)
    images = [images] if isinstance(images, ONE_IMAGE_TYPES) else images
    if not isinstance(images, (list, tuple)):
        raise Gemma3Error(
            f"images: give an image or a list of images (paths, bytes, PIL images or arrays), "
            f"got {type(images).__name__}"
        )
    pixels, _ = process_images(images, model.config.vision.image_size)
    if not len(pixels):
        raise Gemma3Error("no image to classify: give at least one image")
    answers = answer_ids(model.config)
    scores = []
    with mx.stream(generation_stream()):
        for start in range(0, len(pixels), images_per_batch):
            logits = answer_logits(model, prompts, shared, pixels[start : start + images_per_batch], answers)
            scores += policy_scores(logits, start, list(definitions))
    return scores


def check_classifier(model) -> None:
    config = model.config
    if not config.is_shield:
        raise Gemma3Error(
            f"this model is not a ShieldGemma 2 (config.json model_type {config.model_type!r}): image-safety "
            "scores need a ShieldGemma 2 checkpoint (e.g. google/shieldgemma-2-4b-it converted with mlx_gemma3.convert)"
        )


def answer_ids(config) -> list[int]:
    """The "Yes" and "No" token ids: the config's, else Gemma 3's."""
    ids = [config.raw.get("yes_token_index", YES_TOKEN_ID), config.raw.get("no_token_index", NO_TOKEN_ID)]
    vocab = config.text.vocab_size
    if not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
        raise Gemma3Error(f"config.json: yes_token_index / no_token_index {ids} must be token ids below {vocab}")
    return ids


def shared_prefix(prompts: list[list[int]], vision) -> int:
    """How many leading ids every prompt shares (leaving each at least one of its own); the image must lie inside."""
    shortest = min(map(len, prompts))
    length = 0
    while length < shortest - 1 and all(prompt[length] == prompts[0][length] for prompt in prompts):
        length += 1
    if prompts[0][:length].count(vision.image_token_id) != vision.tokens_per_image:
        raise Gemma3Error("the chat template must put the image before the policy text, as ShieldGemma 2's does")
    return length


def answer_logits(model, prompts: list[list[int]], shared: int, pixels: np.ndarray, answers: list[int]) -> np.ndarray:
    """[images × policies, 2]: the Yes and No logits after every prompt, image-major. The images' shared prefix
    runs as one batch; its cache rows are then repeated once per policy, and the policies' rests run as one batch,
    right-padded (a causal model's last real token never sees the padding after it)."""
    count = len(pixels)
    features = model.encode_images(mx.array(pixels))
    cache = batch_cache(model.make_cache(), [0] * count)
    model(mx.array([prompts[0][:shared]] * count), cache=cache, image_features=features)  # logits never evaluated
    mx.eval([layer.state for layer in cache])
    cache = filter_cache(cache, [image for image in range(count) for _ in prompts])
    rests = [prompt[shared:] for prompt in prompts] * count
    width = max(map(len, rests))
    text = model.language_model.model
    hidden = text(text.embed(mx.array([rest + [0] * (width - len(rest)) for rest in rests])), cache)
    last = hidden[mx.arange(len(rests)), mx.array([len(rest) - 1 for rest in rests])]
    return np.array(model.language_model.logits(last)[:, mx.array(answers)].astype(mx.float32))


def policy_scores(logits: np.ndarray, first_image: int, names: list[str]) -> list[PolicyScore]:
    """Softmax over each row's two logits (in float64), as PolicyScores in row order."""
    wide = logits.astype(np.float64)
    probabilities = np.exp(wide - wide.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return [
        PolicyScore(
            first_image + row // len(names),
            names[row % len(names)],
            float(probabilities[row, 0]),
            float(probabilities[row, 1]),
            float(logits[row, 0]),
            float(logits[row, 1]),
        )
        for row in range(len(logits))
    ]
