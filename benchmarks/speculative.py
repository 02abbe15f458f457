"""Speculative decoding against plain decoding: tokens per target forward and wall-clock, same greedy output.

    python benchmarks/speculative.py [--model MODEL] [--draft-model MODEL] [--prompt-lookup 4]
        [--max-tokens 128] [--runs 3] [--json results/speculative.json]

Without --model the demo 270M GGUF (mlx_gemma3.demo_gguf()); without --draft-model prompt lookup drafts. The
prompt is copy-heavy (a passage to repeat with small changes), where prompt lookup pays. Tokens per target
forward = generated tokens / rounds (each round hands out exactly one token of the target's own, so rounds =
tokens not from the draft). Times are medians of --runs runs after one warm-up, in this process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx_gemma3
from mlx_gemma3.model.sources import model_folder

PASSAGE = (
    "The quick brown fox jumps over the lazy dog. MLX is an array framework for machine learning on Apple "
    "silicon. Gemma 3 models come in sizes from 270 million to 27 billion parameters, and the larger ones read "
    "images. Speculative decoding lets a cheap guess be checked by the large model in a single forward pass."
)
PROMPT = f"Repeat this passage exactly, word for word:\n\n{PASSAGE}\n\nRepeated:\n\n{PASSAGE[:40]}"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="target model (default: the demo 270M GGUF)")
    parser.add_argument("--draft-model", help="a draft model of the same vocabulary (default: prompt lookup)")
    parser.add_argument("--prompt-lookup", type=int, default=4, help="tokens drafted per round by prompt lookup")
    parser.add_argument("--num-draft-tokens", type=int, default=3, help="tokens drafted per round by the draft model")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args()


def measure(model, processor, runs: int, **options) -> dict:
    """Median wall-clock seconds, generated tokens, rounds and the tokens themselves over `runs` runs."""
    times, responses = [], []
    for run in range(runs + 1):  # the first is a warm-up
        tic = time.perf_counter()
        responses = list(mlx_gemma3.stream_generate(model, processor, PROMPT, use_chat_template=False, **options))
        if run:
            times.append(time.perf_counter() - tic)
    rounds = sum(not r.from_draft for r in responses)
    return {
        "seconds": statistics.median(times),
        "tokens": len(responses),
        "rounds": rounds,
        "tokens_per_forward": len(responses) / max(rounds, 1),
        "ids": [r.token for r in responses],
    }


def main() -> None:
    args = parse_args()
    model, processor = mlx_gemma3.load(model_folder(args.model or mlx_gemma3.demo_gguf()))
    if args.draft_model:
        draft, _ = mlx_gemma3.load(model_folder(args.draft_model))
        speculative = dict(draft_model=draft, num_draft_tokens=args.num_draft_tokens)
    else:
        speculative = dict(prompt_lookup=args.prompt_lookup)
    plain = measure(model, processor, args.runs, max_tokens=args.max_tokens)
    drafted = measure(model, processor, args.runs, max_tokens=args.max_tokens, **speculative)
    same = plain.pop("ids") == drafted.pop("ids")
    result = {
        "plain": plain,
        "speculative": drafted,
        "same_output": same,
        "speedup": plain["seconds"] / drafted["seconds"],
        "drafting": "draft model" if args.draft_model else f"prompt lookup {args.prompt_lookup}",
    }
    for name in ("plain", "speculative"):
        r = result[name]
        print(
            f"{name:12} {r['tokens']} tokens in {r['seconds']:.2f} s ({r['tokens'] / r['seconds']:.1f} tokens/s), "
            f"{r['tokens_per_forward']:.2f} tokens per target forward"
        )
    print(f"speedup {result['speedup']:.2f}x, same output: {same}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
