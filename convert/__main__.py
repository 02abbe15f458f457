"""Command line: `python -m mlx_gemma3.convert --hf-path IN --mlx-path OUT`."""

from __future__ import annotations

import argparse
import sys

from mlx_gemma3.errors import Gemma3Error

from .hf import DTYPES, convert_hf


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_gemma3.convert",
        description="Convert a Hugging Face Gemma 3 checkpoint into an MLX folder.",
    )
    parser.add_argument("--hf-path", required=True, help="Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("--mlx-path", required=True, help="output folder (must not exist unless --force)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = convert_hf(args.hf_path, args.mlx_path, dtype=args.dtype, force=args.force)
    except Gemma3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
