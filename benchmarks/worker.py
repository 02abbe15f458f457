"""One measurement in a fresh process: load a model, prefill a prompt, decode, print one JSON line.

    python benchmarks/worker.py --engine ours|mlx_lm|llama_cpp --model PATH --prompt-tokens 512 \
        --generation-tokens 128 --suppress 1,106 [--t0 EPOCH_SECONDS] [--compute-dtype bfloat16]

`--t0` is the parent's clock just before it started this process, so time to first token counts the
interpreter's start, the imports and the model load. Peak memory is the process's peak resident set (what
the OS charged, comparable across engines) and, for MLX engines, MLX's own allocator peak.
Every engine gets the same token ids (BOS + a fixed random draw) and has the --suppress ids suppressed
(compare.py passes the EOS ids: EOS and <end_of_turn>), so each run decodes exactly --generation-tokens tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

T_START = time.time()

SUPPRESS = -1e9


def prompt_token_ids(count: int, seed: int = 0) -> list[int]:
    """BOS then `count`−1 ordinary ids (no special or unused tokens), the same for every engine."""
    import numpy as np

    return [2, *np.random.RandomState(seed).randint(1000, 200_000, size=count - 1).tolist()]


def timed(stream, prompt_tokens: int, t0: float) -> dict:
    """Time a token stream: prefill = prompt tokens / time to the first token; decode over the rest."""
    tic = time.perf_counter()
    stamps = []
    last = None
    for last in stream:  # noqa: B007 (the last response is returned)
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            first_wall = time.time()
    n = len(stamps)
    out = {
        "prompt_tokens": prompt_tokens,
        "generated": n,
        "prefill_tps": prompt_tokens / (stamps[0] - tic),
        "decode_tps": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else None,
        "ttft_s": first_wall - t0,
        "first_token_s": stamps[0] - tic,
    }
    return out, last


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def run_ours(args) -> dict:
    import mlx.core as mx

    import mlx_gemma3

    dtype = getattr(mx, args.compute_dtype) if args.compute_dtype else None
    tic = time.perf_counter()
    model, processor = mlx_gemma3.load(args.model, compute_dtype=dtype)
    load_s = time.perf_counter() - tic
    ids = prompt_token_ids(args.prompt_tokens)
    stream = mlx_gemma3.stream_generate(
        model,
        processor,
        ids,
        max_tokens=args.generation_tokens,
        logit_bias={i: SUPPRESS for i in args.suppress},
        prefill_step_size=args.prefill_step_size,
    )
    out, last = timed(stream, len(ids), args.t0)
    out.update(
        load_s=load_s,
        peak_mlx_gb=mx.get_peak_memory() / 1e9,
        reported_prompt_tps=last.prompt_tps,
        reported_generation_tps=last.generation_tps,
    )
    return out


def run_mlx_lm(args) -> dict:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_logits_processors

    tic = time.perf_counter()
    model, tokenizer = mlx_lm.load(args.model)
    load_s = time.perf_counter() - tic
    ids = prompt_token_ids(args.prompt_tokens)
    stream = mlx_lm.stream_generate(
        model,
        tokenizer,
        ids,
        max_tokens=args.generation_tokens,
        logits_processors=make_logits_processors(logit_bias={i: SUPPRESS for i in args.suppress}),
        prefill_step_size=args.prefill_step_size,
    )
    out, last = timed(stream, len(ids), args.t0)
    out.update(
        load_s=load_s,
        peak_mlx_gb=mx.get_peak_memory() / 1e9,
        reported_prompt_tps=last.prompt_tps,
        reported_generation_tps=last.generation_tps,
    )
    return out


def run_llama_cpp(args) -> dict:
    from llama_cpp import Llama

    tic = time.perf_counter()
    llm = Llama(
        model_path=args.model,
        n_ctx=args.prompt_tokens + args.generation_tokens + 8,
        n_batch=args.prefill_step_size,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - tic
    ids = prompt_token_ids(args.prompt_tokens)
    stream = llm.generate(ids, temp=0.0, top_k=1, logits_processor=suppressing(args.suppress), reset=True)

    def bounded():
        for n, token in enumerate(stream, start=1):
            yield token
            if n == args.generation_tokens:
                return

    out, _ = timed(bounded(), len(ids), args.t0)
    out.update(load_s=load_s, peak_mlx_gb=None)
    return out


def suppressing(ids: list[int]):
    """A llama.cpp logits processor that keeps `ids` from being sampled."""

    def process(_ids, logits):
        logits[ids] = SUPPRESS
        return logits

    return process


def _ids(text: str) -> list[int]:
    return [int(i) for i in text.split(",")]


ENGINES = {"ours": run_ours, "mlx_lm": run_mlx_lm, "llama_cpp": run_llama_cpp}


def main() -> None:
    parser = argparse.ArgumentParser(description="one benchmark measurement (see the module docstring)")
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--generation-tokens", type=int, default=128)
    parser.add_argument("--prefill-step-size", type=int, default=512)
    parser.add_argument("--compute-dtype", help="float dtype of the activations (ours only)")
    parser.add_argument(
        "--suppress", type=_ids, required=True, help="comma list of token ids never sampled (the EOS ids)"
    )
    parser.add_argument("--t0", type=float, default=T_START)
    args = parser.parse_args()
    out = ENGINES[args.engine](args)
    out.update(engine=args.engine, model=args.model, peak_rss_gb=peak_rss_gb())
    print(json.dumps(out), flush=True)
    import mlx.core as mx

    if hasattr(mx, "clear_streams"):  # MLX's own exit-time cleanup of streams runs too late (see mlx_gemma3.cli)
        mx.clear_streams()


if __name__ == "__main__":
    sys.exit(main())
