"""`python -m mlx_gemma3.shield`: ShieldGemma 2 image-safety scores per image and policy; exit 1 when one reaches --threshold."""

from __future__ import annotations

import argparse
import json
import sys

from .cli import Parser, exit_with, opened_images, run
from .generation.classify import PolicyScore, classify
from .loader import load
from .model.sources import model_folder
from .processing.shield_prompt import DEFAULT_POLICIES

__all__ = ["DEFAULT_POLICIES", "PolicyScore", "classify", "main"]
DEFAULT_THRESHOLD = 0.5
FLAGGED_EXIT = 1  # some image reached the threshold for some policy (a shell script can refuse the upload)


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--threshold must be a probability from 0 to 1, got {text!r}")
    return value


def custom_policy(text: str) -> tuple[str, str]:
    name, equals, description = text.partition("=")
    if not equals or not name.strip() or not description.strip():
        raise argparse.ArgumentTypeError(f"--custom-policy must be NAME=DESCRIPTION, got {text!r}")
    return name.strip(), description.strip()


def parser() -> Parser:
    built_in = ", ".join(DEFAULT_POLICIES)
    parser = Parser(
        "shield",
        description="Score images against safety policies with a ShieldGemma 2 model.",
    )
    parser.add_argument("--model", required=True, help="a ShieldGemma 2 MLX folder (or Hugging Face repo id)")
    parser.add_argument(
        "--image", action="append", required=True, metavar="FILE", help="an image to check (repeatable)"
    )
    parser.add_argument(
        "--policy",
        action="append",
        metavar="NAME",
        help=f"a policy to check (repeatable; default: all — built in: {built_in}, plus custom ones)",
    )
    parser.add_argument(
        "--custom-policy",
        action="append",
        type=custom_policy,
        default=[],
        metavar="NAME=TEXT",
        help="define a policy (repeatable); a built-in name gets this text instead",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--threshold",
        type=probability,
        default=DEFAULT_THRESHOLD,
        metavar="P",
        help=f"exit {FLAGGED_EXIT} when a probability of violation reaches P (default {DEFAULT_THRESHOLD})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        images = opened_images(args.image)  # a missing or broken file is refused before the model loads
        model, processor = load(model_folder(args.model))
        scores = classify(model, processor, images, args.policy, dict(args.custom_policy))
        flagged = any(score.yes_probability >= args.threshold for score in scores)
        print(
            as_json(scores, args.image, args.threshold, flagged)
            if args.json
            else table(scores, args.image, args.threshold)
        )
        return FLAGGED_EXIT if flagged else 0

    return run(body)


def table(scores: list[PolicyScore], images: list[str], threshold: float) -> str:
    width = max(len("image"), *(len(name) for name in images))
    policy_width = max(len("policy"), *(len(score.policy) for score in scores))
    lines = [f"{'image':<{width}}  {'policy':<{policy_width}}  P(violates)  verdict"]
    for score in scores:
        verdict = "VIOLATES" if score.yes_probability >= threshold else "ok"
        lines.append(
            f"{images[score.image]:<{width}}  {score.policy:<{policy_width}}  {score.yes_probability:11.4f}  {verdict}"
        )
    return "\n".join(lines)


def as_json(scores: list[PolicyScore], images: list[str], threshold: float, flagged: bool) -> str:
    results = [
        {
            "image": images[s.image],
            "policy": s.policy,
            "yes_probability": s.yes_probability,
            "no_probability": s.no_probability,
            "yes_logit": s.yes_logit,
            "no_logit": s.no_logit,
            "violates": s.yes_probability >= threshold,
        }
        for s in scores
    ]
    return json.dumps({"threshold": threshold, "flagged": flagged, "results": results}, indent=2)


if __name__ == "__main__":
    exit_with(main(sys.argv[1:]))
