"""`python -m mlx_gemma3.benchmark --model M`: prefill and decode speed, time to first token and peak memory
of a Gemma 3 model on this machine (medians over --runs, after a short warm-up that compiles the kernels).

Internal: a command line, whose flags are its interface; the Python API is listed in docs/api.md."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .cli import Parser, add_kv_cache_flags, run
from .errors import Gemma3Error
from .generation.reply import eos_ids
from .generation.text_stream import stream_generate
from .generation.thread_streams import generation_stream
from .loader import load
from .model.config import FLOAT_DTYPES
from .model.device import FLOAT_TYPES, wired_limit
from .model.quantize import DEFAULT_GROUP_SIZE
from .model.sources import model_folder

FIGURES = ("prefill_tps", "decode_tps", "ttft_s", "peak_memory_gb", "kv_cache_bytes")
SUPPRESS = -1e9  # logit bias that keeps EOS out, so every run decodes exactly --generation-tokens
WARMUP = (16, 2)  # prompt and generated tokens of the warm-up run


def parse_args(argv: list[str] | None):
    parser = Parser(
        "benchmark",
        description="Measure prefill and decode tokens-per-second, time to first token and peak memory of a "
        "Gemma 3 model on this machine. The prompt is a fixed draw of ordinary token ids; EOS is suppressed so "
        "every run decodes the same number of tokens.",
    )
    parser.add_argument(
        "--model",
        help="MLX model folder, or a Gemma 3 .gguf file (converted once into the cache); default: "
        "the bundled Gemma 3 270M of the demo extra",
    )
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length in tokens (default 512)")
    parser.add_argument("--generation-tokens", type=int, default=128, help="tokens to decode (default 128)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs; medians are reported (default 3)")
    parser.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per prefill chunk")
    add_kv_cache_flags(parser)
    parser.add_argument(
        "--dtype",
        choices=FLOAT_DTYPES,
        help="compute dtype (default: float32 on the CPU, bfloat16 on a GPU)",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the short warm-up run")
    parser.add_argument("--json", type=Path, help="also write every run and the medians to this JSON file")
    return parser.parse_args(argv)


def check(args) -> None:
    if args.prompt_tokens < 1 or args.generation_tokens < 1 or args.runs < 1 or args.prefill_step_size < 1:
        raise Gemma3Error("--prompt-tokens, --generation-tokens, --runs and --prefill-step-size must be at least 1")
    if args.json is not None and not args.json.parent.is_dir():
        raise Gemma3Error(f"cannot write {args.json}: folder {args.json.parent} does not exist")


def prompt_ids(config, count: int, seed: int = 0) -> list[int]:
    """BOS then count−1 ordinary token ids drawn from the vocabulary (no special, unused or image tokens)."""
    vocab = config.text.vocab_size
    low, high = min(1000, vocab // 4), min(vocab, 200_000)
    ids = np.random.RandomState(seed).randint(low, high, size=count - 1)
    if config.vision is not None:
        ids[ids == config.vision.image_token_id] = low
    return [2, *ids.tolist()][:count]


def measure(model, processor, ids: list[int], generation_tokens: int, **options) -> dict:
    """One run from an empty cache: prefill, time to first token, decode rate, peak memory, KV bytes."""
    cache = model.make_cache(options.get("kv_bits"), options.get("kv_group_size", DEFAULT_GROUP_SIZE))
    vocab = processor.config.text.vocab_size
    bias = {i: SUPPRESS for i in eos_ids(processor) if 0 <= i < vocab}
    mx.clear_cache()
    mx.reset_peak_memory()
    stamps = []
    tic = time.perf_counter()
    stream = stream_generate(
        model, processor, ids, cache=cache, max_tokens=generation_tokens, logit_bias=bias, **options
    )
    for _ in stream:
        stamps.append(time.perf_counter())
    n = len(stamps)
    return {
        "prefill_tps": len(ids) / (stamps[0] - tic),
        "decode_tps": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else None,
        "ttft_s": stamps[0] - tic,
        "generated": n,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "kv_cache_bytes": sum(layer.nbytes for layer in cache),
    }


def medians(runs: list[dict]) -> dict:
    out = {}
    for key in FIGURES:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def benchmark(folder: str, args) -> dict:
    dtype = getattr(mx, args.dtype) if args.dtype else None
    tic = time.perf_counter()
    model, processor = load(folder, compute_dtype=dtype)
    load_s = time.perf_counter() - tic
    config = processor.config
    context = config.text.max_position_embeddings
    if args.prompt_tokens + args.generation_tokens > context:
        raise Gemma3Error(
            f"--prompt-tokens + --generation-tokens is {args.prompt_tokens + args.generation_tokens}; "
            f"the model's context is {context}"
        )
    options = dict(prefill_step_size=args.prefill_step_size, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    tokens, streams = args.prompt_tokens + args.generation_tokens, (generation_stream(),)
    with wired_limit(model, tokens, streams, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size):  # as on a Mac
        if not args.no_warmup:
            measure(model, processor, prompt_ids(config, min(WARMUP[0], args.prompt_tokens)), WARMUP[1], **options)
        ids = prompt_ids(config, args.prompt_tokens)
        runs = []
        for i in range(args.runs):
            runs.append(measure(model, processor, ids, args.generation_tokens, **options))
            print(f"run {i + 1}/{args.runs}: {describe(runs[-1])}", file=sys.stderr, flush=True)
    weight = next(v.dtype for _, v in _arrays(model.parameters()) if v.dtype in FLOAT_TYPES)
    return {
        "model": folder,
        "device": str(mx.default_device()),
        "compute_dtype": str(weight).removeprefix("mlx.core."),
        "mlx_version": mx.__version__,
        "prompt_tokens": args.prompt_tokens,
        "generation_tokens": args.generation_tokens,
        "load_s": load_s,
        "runs": runs,
        "median": medians(runs),
    }


def _arrays(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def describe(figures: dict) -> str:
    decode = "n/a" if figures["decode_tps"] is None else f"{figures['decode_tps']:.2f}"
    return (
        f"prefill {figures['prefill_tps']:.2f} tok/s, decode {decode} tok/s, first token {figures['ttft_s']:.2f} s, "
        f"peak memory {figures['peak_memory_gb']:.3f} GB"
    )


def report(result: dict, out) -> None:
    m = result["median"]
    decode = "n/a (one token)" if m["decode_tps"] is None else f"{m['decode_tps']:.2f} tokens-per-sec"
    where = f"{result['device']}, {result['compute_dtype']}, MLX {result['mlx_version']}"
    print(f"Model: {result['model']} ({where})", file=out)
    print(f"Load: {result['load_s']:.2f} s", file=out)
    print(f"Median of {len(result['runs'])} run(s):", file=out)
    print(f"Prefill: {result['prompt_tokens']} tokens, {m['prefill_tps']:.2f} tokens-per-sec", file=out)
    print(f"Decode: {result['generation_tokens']} tokens, {decode}", file=out)
    print(f"Time to first token: {m['ttft_s']:.3f} s (model loaded; prefill and the first step)", file=out)
    print(f"Peak memory: {m['peak_memory_gb']:.3f} GB", file=out)
    print(f"KV cache: {m['kv_cache_bytes'] / 1e6:.1f} MB", file=out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        check(args)
        result = benchmark(model_folder(args.model), args)
        report(result, sys.stdout)
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2))
        return 0

    return run(body)


if __name__ == "__main__":
    from .cli import exit_with

    exit_with(main())
