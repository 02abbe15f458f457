"""Command line: `python -m mlx_gemma3.convert --hf-path IN --mlx-path OUT`.

Internal: a command line, whose flags are its interface; the Python API is listed in docs/api.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlx_gemma3.cli import Parser
from mlx_gemma3.errors import Gemma3Error
from mlx_gemma3.model.embedding_model import is_sentence_folder
from mlx_gemma3.model.quantize import BITS, DEFAULT_BITS, DEFAULT_GROUP_SIZE, GROUP_SIZES

from .gguf import convert_gguf
from .gguf_file import check_sha256
from .hf import DTYPES, Quantization, convert_hf
from .hub import resolve_hf_path
from .sentence_folder import convert_sentence_folder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(
        "convert",
        description="Convert a Hugging Face Gemma 3 checkpoint (or EmbeddingGemma's sentence-transformers folder) "
        "into an MLX folder.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-path", help="Hugging Face model folder, or a Hub repo id (owner/name) to download")
    source.add_argument("--gguf", help="a llama.cpp GGUF file of a Gemma 3 model")
    parser.add_argument("--mmproj", help="with --gguf: llama.cpp's mmproj GGUF holding the vision tower")
    parser.add_argument(
        "--verify",
        metavar="SHA256",
        help="with --gguf: refuse the file unless its SHA-256 is this (GGUF has no checksum)",
    )
    parser.add_argument("--mlx-path", required=True, help="output folder (must not exist unless --force)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize linear and embedding layers")
    # bits, group size and recipe are checked by quantization_plan, whose error names the accepted values;
    # each of them implies -q
    parser.add_argument("--q-bits", type=int, help=f"bits per weight: {_listed(BITS, DEFAULT_BITS)}; implies -q")
    parser.add_argument(
        "--q-group-size", type=int, help=f"weights per scale: {_listed(GROUP_SIZES, DEFAULT_GROUP_SIZE)}; implies -q"
    )
    parser.add_argument(
        "--quant-recipe",
        help="uniform (default): every layer at --q-bits; mixed: embedding/head, attention V and MLP down at 8 bits; "
        "implies -q",
    )
    return parser.parse_args(argv)


def quantization(args: argparse.Namespace) -> Quantization | None:
    """What -q asks for; --q-bits, --q-group-size or --quant-recipe without -q imply it."""
    given = {"bits": args.q_bits, "group_size": args.q_group_size, "recipe": args.quant_recipe}
    given = {name: value for name, value in given.items() if value is not None}
    return Quantization(**given) if args.quantize or given else None


def _listed(values: tuple[int, ...], default: int) -> str:
    """'32, 64 (default) or 128'."""
    named = [f"{v} (default)" if v == default else str(v) for v in values]
    return ", ".join(named[:-1]) + " or " + named[-1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        quantize = quantization(args)
        if args.verify and not args.gguf:
            raise Gemma3Error("--verify checks a GGUF file: use it with --gguf")
        if args.verify:
            check_sha256(Path(args.gguf), args.verify)
        if args.gguf:
            out = convert_gguf(args.gguf, args.mlx_path, args.dtype, args.force, quantize, args.mmproj)
        else:
            hf_path = resolve_hf_path(args.hf_path)
            convert = convert_sentence_folder if is_sentence_folder(hf_path) else convert_hf
            out = convert(hf_path, args.mlx_path, dtype=args.dtype, force=args.force, quantize=quantize)
    except Gemma3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from mlx_gemma3.cli import exit_with

    exit_with(main())
