"""mlx_gemma3 against mlx-lm (and llama.cpp when llama-cpp-python is installed) on the same weights.

    python benchmarks/compare.py [--runs 3 --prompt-tokens 512 --generation-tokens 128] \
        [--configs float32,bf16,8bit,4bit] [--engines ours,mlx_lm,llama_cpp] [--json results.json]

The PyPI 270M GGUF is dequantized once into a float32 HF-layout folder, which each engine's own converter
turns into every config (benchmarks/prepare.py). Each measurement runs in a fresh process
(benchmarks/worker.py), so time to first token counts the interpreter, the imports and the load, and peak
memory is the process's own. Runs alternate between engines (the order flips every round); the table shows
medians. `ours:bfloat16` as an engine runs mlx_gemma3 with bfloat16 activations instead of the CPU default
(float32). llama.cpp runs the GGUF itself (Q4_K_M), in its own row.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prepare import CONFIGS, converter_stats, gguf_file, prepare  # noqa: E402

from mlx_gemma3.processing.tokenizer import EOS_IDS  # noqa: E402

FIGURES = ("prefill_tps", "decode_tps", "ttft_s", "peak_rss_gb", "peak_mlx_gb", "load_s")
ENGINE_NAMES = {
    "ours": "mlx_gemma3",
    "mlx_lm": "mlx-lm",
    "llama_cpp": "llama.cpp",
    "ours:bfloat16": "mlx_gemma3 bf16 act.",
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gemma3-bench"), help="where weights are kept")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument(
        "--engines", default="ours,mlx_lm,llama_cpp", help="comma list: ours, mlx_lm, llama_cpp, ours:bfloat16"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--generation-tokens", type=int, default=128)
    parser.add_argument("--prefill-step-size", type=int, default=512)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "compare.json")
    return parser.parse_args()


def measure(engine: str, model: Path, args) -> dict:
    name, _, dtype = engine.partition(":")
    cmd = [
        sys.executable,
        str(HERE / "worker.py"),
        "--engine",
        name,
        "--model",
        str(model),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--generation-tokens",
        str(args.generation_tokens),
        "--prefill-step-size",
        str(args.prefill_step_size),
        "--suppress",
        ",".join(map(str, EOS_IDS)),
    ]
    if dtype:
        cmd += ["--compute-dtype", dtype]
    t0 = time.time()
    result = subprocess.run([*cmd, "--t0", repr(t0)], capture_output=True, text=True)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0], "engine": engine}
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["engine"] = engine
    return out


def jobs(args, folders: dict, engines: list[str]) -> list[tuple[str, str, Path]]:
    """(config, engine, model path) for one round."""
    out = []
    for config, by_engine in folders.items():
        for engine in engines:
            if engine == "llama_cpp":
                continue
            out.append((config, engine, by_engine[engine.partition(":")[0]]))
    if "llama_cpp" in engines:
        out.append(("gguf-q4_k_m", "llama_cpp", gguf_file(args.work)))
    return out


def summarise(results: list[dict]) -> dict:
    table: dict = {}
    for r in results:
        if "error" in r:
            continue
        row = table.setdefault(r["config"], {}).setdefault(r["engine"], {})
        for key in FIGURES:
            if r.get(key) is not None:
                row.setdefault(key, []).append(r[key])
    return {
        c: {e: {k: statistics.median(v) for k, v in figs.items()} for e, figs in by.items()} for c, by in table.items()
    }


def ratios(medians: dict) -> dict:
    """ours / mlx-lm for each figure (tok/s: > 1 is faster; seconds and GB: < 1 is better)."""
    out = {}
    for config, by in medians.items():
        if "ours" in by and "mlx_lm" in by:
            out[config] = {
                k: by["ours"][k] / by["mlx_lm"][k] for k in FIGURES if by["ours"].get(k) and by["mlx_lm"].get(k)
            }
    return out


def table(medians: dict, ratio: dict) -> str:
    lines = [
        "| config | engine | prefill tok/s | decode tok/s | TTFT from process start (s) | peak RSS (GB) | MLX peak (GB) | load (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v, digits=2):
        return "–" if v is None else f"{v:.{digits}f}"

    for config, by in medians.items():
        for engine, m in by.items():
            lines.append(
                f"| {config} | {ENGINE_NAMES.get(engine, engine)} | {fmt(m.get('prefill_tps'))} | {fmt(m.get('decode_tps'))} | "
                f"{fmt(m.get('ttft_s'), 1)} | {fmt(m.get('peak_rss_gb'), 3)} | {fmt(m.get('peak_mlx_gb'), 3)} | {fmt(m.get('load_s'), 1)} |"
            )
        if config in ratio:
            r = ratio[config]
            lines.append(
                f"| {config} | ours ÷ mlx-lm | {fmt(r.get('prefill_tps'))}× | {fmt(r.get('decode_tps'))}× | "
                f"{fmt(r.get('ttft_s'))}× | {fmt(r.get('peak_rss_gb'))}× | {fmt(r.get('peak_mlx_gb'))}× | {fmt(r.get('load_s'))}× |"
            )
    return "\n".join(lines)


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {
        "os": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
    }


def versions() -> dict:
    out = {}
    for dist in ("mlx", "mlx-lm", "mlx-gemma3", "llama-cpp-python", "transformers", "gguf"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    import mlx.core as mx

    out["mlx_device"] = str(mx.default_device())
    return out


def main() -> None:
    args = parse_args()
    engines = args.engines.split(",")
    notes = []
    if "llama_cpp" in engines and importlib.util.find_spec("llama_cpp") is None:
        engines.remove("llama_cpp")
        notes.append(
            "llama.cpp skipped: llama-cpp-python is not installed (pip install llama-cpp-python builds it from source)"
        )
    if "mlx_lm" in engines and importlib.util.find_spec("mlx_lm") is None:
        engines.remove("mlx_lm")
        notes.append("mlx-lm skipped: not installed (pip install mlx-lm, plus mlx[cpu] on Linux)")
    for note in notes:
        print(f"[note] {note}", file=sys.stderr)
    mlx_engines = sorted({e.partition(":")[0] for e in engines if e != "llama_cpp"})
    folders = prepare(args.work, args.configs.split(","), mlx_engines)
    round_jobs = jobs(args, folders, engines)
    results = []
    tic = time.perf_counter()
    for run in range(args.runs):
        order = round_jobs if run % 2 == 0 else list(reversed(round_jobs))
        for config, engine, model in order:
            r = measure(engine, model, args)
            r.update(config=config, round=run)
            results.append(r)
            shown = r.get("error") or ", ".join(
                f"{k} {r[k]:.3g}" for k in ("prefill_tps", "decode_tps", "ttft_s", "peak_rss_gb")
            )
            print(
                f"[{time.perf_counter() - tic:6.0f} s] round {run + 1} {config:>11} {engine:<13} {shown}",
                file=sys.stderr,
                flush=True,
            )
    medians = summarise(results)
    ratio = ratios(medians)
    text = table(medians, ratio)
    print(text)
    for note in notes:
        print(f"\nNote: {note}")
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": "MLX CPU backend on Linux" if sys.platform.startswith("linux") else sys.platform,
        "machine": machine(),
        "versions": versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "notes": notes,
        "converter": converter_stats(args.work),
        "medians": medians,
        "ours_over_mlx_lm": ratio,
        "table_markdown": text,
        "runs": results,
        "seconds": time.perf_counter() - tic,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
