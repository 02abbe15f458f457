"""Shared command-line pieces: one-line argument errors, the model and sampling flags, error-to-exit handling."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import Gemma3Error
from .model.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, KV_BITS
from .model.sources import model_folder  # noqa: F401 (the command lines' --model, re-exported)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (and exit status 2) instead of usage plus error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_model_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--model", required=required,
        help="MLX model folder written by mlx_gemma3.convert, or a Gemma 3 .gguf file (converted once into the cache)",
    )
    parser.add_argument("--system", help="system prompt (folded into the first user turn, as Gemma 3 expects)")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", "-m", type=int, default=256, help="most tokens to generate (default 256)")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p × the top probability")
    parser.add_argument("--repetition-penalty", type=float, help="penalise tokens already seen (e.g. 1.1)")
    parser.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    parser.add_argument("--max-kv-size", type=int, help="bound every layer's cache to this many tokens")
    add_kv_cache_flags(parser)
    parser.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per prefill chunk")


def add_kv_cache_flags(parser: argparse.ArgumentParser) -> None:
    bits = " or ".join(map(str, KV_BITS))
    parser.add_argument("--kv-bits", type=int, choices=KV_BITS, help=f"quantize the KV cache to {bits} bits")
    parser.add_argument(
        "--kv-group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=GROUP_SIZES,
        help=f"KV quantization group (default {DEFAULT_GROUP_SIZE})",
    )


def sampling_options(args: argparse.Namespace) -> dict:
    names = (
        "max_tokens", "temp", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
        "max_kv_size", "kv_bits", "kv_group_size", "prefill_step_size",
    )
    return {name: getattr(args, name) for name in names}


def exit_with(code: int):
    """End a command-line process. MLX's own exit-time cleanup runs too late, so the main thread drops its
    streams first (only here: afterwards this thread can run no MLX work)."""
    from .generation.streams import release_thread_streams

    release_thread_streams()
    raise SystemExit(code)


def run(main: Callable[[], int]) -> int:
    """Run a CLI body: a Gemma3Error becomes one `error:` line and exit 1; Ctrl-C exits 130."""
    try:
        return main()
    except Gemma3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`): nothing more to say
        return 0
