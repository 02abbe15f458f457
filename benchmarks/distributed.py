"""Decode and prefill tokens/s of `python -m mlx_gemma3.generate` in one process and over two ranks (pipeline, tensor).

Every configuration runs the same command line on the same model, prompt and token count; the two-rank runs are
started by `mlx.launch --backend ring -n 2` on this machine (loopback), so both ranks share its cores and memory.
Runs alternate between configurations; the table shows medians. Prints a markdown table and writes JSON."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import mlx_gemma3

CONFIGS = {"1 process": None, "2 ranks, pipeline": "pipeline", "2 ranks, tensor": "tensor"}
PROMPT = "The history of the printing press begins in the fifteenth century, when"
STATS = re.compile(r"Prompt: (\d+) tokens, ([\d.]+) tokens-per-sec\nGeneration: (\d+) tokens, ([\d.]+) tokens-per-sec")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(model: str, mode: str | None, tokens: int) -> list[str]:
    generate = [
        sys.executable,
        "-m",
        "mlx_gemma3.generate",
        "--model",
        model,
        "--prompt",
        PROMPT,
        "--no-chat-template",
        "-m",
        str(tokens),
    ]
    if mode is None:
        return generate
    launcher = str(Path(sys.executable).parent / "mlx.launch")
    return [
        launcher,
        "--backend",
        "ring",
        "-n",
        "2",
        "--starting-port",
        str(free_port()),
        "--",
        *generate,
        "--distributed",
        mode,
    ]


def measure(model: str, mode: str | None, tokens: int) -> dict:
    done = subprocess.run(
        command(model, mode, tokens),
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    found = STATS.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{mode or 'one process'} failed:\n{done.stderr[-2000:]}")
    held = re.search(r"Text weights held: (.*)", done.stderr)
    return {
        "prompt_tokens": int(found[1]),
        "prefill_tps": float(found[2]),
        "generated": int(found[3]),
        "decode_tps": float(found[4]),
        "weights": held[1] if held else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo Gemma 3 270M)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens to generate per run (default 128)")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (default 3)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed.json"))
    args = parser.parse_args()
    model = str(args.model or mlx_gemma3.demo_model())
    runs = {name: [] for name in CONFIGS}
    for _ in range(args.runs):
        for name, mode in CONFIGS.items():
            runs[name].append(measure(model, mode, args.tokens))
            print(f"{name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    print(f"| {Path(model).name}, {args.tokens} tokens | decode tok/s | prefill tok/s | text weights per rank |")
    print("|---|---|---|---|")
    base = statistics.median(r["decode_tps"] for r in runs["1 process"])
    for name, results in runs.items():
        decode = statistics.median(r["decode_tps"] for r in results)
        prefill = statistics.median(r["prefill_tps"] for r in results)
        print(f"| {name} | {decode:.1f} ({decode / base:.2f}×) | {prefill:.1f} | {results[0]['weights'] or 'all'} |")
    Path(args.out).write_text(json.dumps({"model": model, "tokens": args.tokens, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
