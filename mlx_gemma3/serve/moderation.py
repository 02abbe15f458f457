"""POST /v1/moderations: OpenAI's moderation request with `image_url` inputs, answered with ShieldGemma 2's
per-policy scores, one result per image.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import Gemma3Error
from ..generation.classify import PolicyScore, check_classifier, classify
from ..processing.shield_prompt import policy_definitions
from .requests import RequestError, check_fields, image_source

MODERATIONS_PATH = "/v1/moderations"
# `policies` and `custom_policies` are this server's own: classify's arguments of the same names.
MODERATION_FIELDS = {"model", "input", "policies", "custom_policies"}
FLAG_THRESHOLD = 0.5  # a result is flagged when a policy's probability of violation reaches this


@dataclass
class Moderation:
    """A checked moderation request: the images (bytes or allowed paths) and the policies to score them against."""

    images: list
    policies: list[str] | None
    custom_policies: dict[str, str] | None


def parse_moderation(body: dict, image_dirs: tuple[Path, ...] = ()) -> Moderation:
    check_fields(body, MODERATION_FIELDS)
    items = body.get("input")
    if not isinstance(items, list) or not items:
        raise RequestError(
            "'input' must be a non-empty list of {'type': 'image_url', 'image_url': {'url': ...}} items "
            "(this model classifies images, not text)",
            param="input",
        )
    images = [image_item(item, i, image_dirs) for i, item in enumerate(items)]
    try:
        policy_definitions(body.get("policies"), body.get("custom_policies"))
    except Gemma3Error as e:
        raise RequestError(str(e), param="policies") from None
    return Moderation(images, body.get("policies"), body.get("custom_policies"))


def image_item(item, i: int, image_dirs: tuple[Path, ...]):
    kind = item.get("type") if isinstance(item, dict) else None
    if kind != "image_url":
        raise RequestError(
            f"input[{i}]: only 'image_url' items are classified (ShieldGemma 2 reads images; "
            f"got {kind or type(item).__name__!r})",
            param="input",
        )
    image_url = item.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    return image_source(url, f"input[{i}]", image_dirs, param="input")


def check_moderator(model) -> None:
    """A 400 before anything is queued when the served model is not a ShieldGemma 2."""
    try:
        check_classifier(model)
    except Gemma3Error as e:
        raise RequestError(f"{MODERATIONS_PATH} needs a ShieldGemma 2 model: {e}") from None


def moderate(model, processor, request: Moderation, model_id: str) -> dict:
    """Score the request's images (call it on the thread that owns the model) and build the reply body."""
    scores = classify(model, processor, request.images, request.policies, request.custom_policies)
    return moderation_body(scores, len(request.images), model_id)


def moderation_body(scores: list[PolicyScore], images: int, model_id: str) -> dict:
    results = []
    for image in range(images):
        own = [score for score in scores if score.image == image]
        categories = {score.policy: score.yes_probability >= FLAG_THRESHOLD for score in own}
        results.append(
            {
                "flagged": any(categories.values()),
                "categories": categories,
                "category_scores": {score.policy: score.yes_probability for score in own},
                "category_applied_input_types": {score.policy: ["image"] for score in own},
            }
        )
    return {"id": f"modr-{uuid.uuid4().hex[:24]}", "model": model_id, "results": results}
