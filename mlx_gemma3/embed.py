"""`python -m mlx_gemma3.embed`: EmbeddingGemma vectors for texts, one JSON array per line, in input order.

Internal: a command line, whose flags are its interface; the Python API is listed in docs/api.md."""

from __future__ import annotations

import json
import sys

from .cli import Parser, exit_with, read_text, run
from .errors import Gemma3Error
from .generation.encode import MATRYOSHKA, embed
from .loader import load_embedding

EPILOG = (
    "Needs EmbeddingGemma converted to an MLX folder: python -m mlx_gemma3.convert --hf-path "
    "google/embeddinggemma-300m --mlx-path embeddinggemma (the demo 270M generates text and has no embeddings)."
)


def parse_args(argv: list[str] | None):
    parser = Parser("embed", description="Embed texts with EmbeddingGemma.", epilog=EPILOG)
    parser.add_argument("--model", required=True, help="EmbeddingGemma MLX folder (or a Hub repo id of one)")
    parser.add_argument("--text", "-t", action="append", default=[], help="a text to embed (repeatable)")
    parser.add_argument("--input", metavar="FILE", help="a file of texts, one per line ('-': standard input)")
    parser.add_argument(
        "--task",
        help="the task prompt: query or document for retrieval; classification, clustering, sts (sentence "
        "similarity) and the model's other tasks for symmetric uses (default: none)",
    )
    parser.add_argument("--title", help="with --task document: the documents' title")
    parser.add_argument(
        "--dimensions",
        type=int,
        help=f"keep this many values and re-normalise (EmbeddingGemma: {', '.join(map(str, MATRYOSHKA))})",
    )
    return parser.parse_args(argv)


def texts(args) -> list[str]:
    """The --text values, then the lines of --input (blank lines skipped)."""
    found = list(args.text)
    if args.input:
        content = sys.stdin.read() if args.input == "-" else read_text(args.input, "--input")
        found += [line for line in content.splitlines() if line.strip()]
    if not found:
        raise Gemma3Error("nothing to embed: give --text TEXT (repeatable) or --input FILE")
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        inputs = texts(args)
        model = load_embedding(args.model)
        for vector in embed(model, inputs, task=args.task, dimensions=args.dimensions, title=args.title):
            print(json.dumps(vector.tolist()))
        return 0

    return run(body)


if __name__ == "__main__":
    exit_with(main())
