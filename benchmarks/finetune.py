"""LoRA training step time and peak memory on the 270M: mlx_gemma3 against mlx-lm's LoRA, same weights, same batches.

    python benchmarks/finetune.py [--work /tmp/gemma3-bench --steps 10 --batch-size 4] [--json results.json]

Both engines train rank-8 LoRA (scale 2) on every attention and MLP projection of all 18 layers with Adam, on the
same token batches (the JSON-extraction sentences of examples/finetune_json.py), from their own float32
conversions of the same weights (benchmarks/prepare.py): every token counted, with and without gradient
checkpointing, and with the prompt masked (only the JSON answer counts: mlx-lm's `--mask-prompt` offsets).
Each (engine, checkpointing) pair runs in a fresh process, so peak memory is that run's own; the first step
(graph building, allocations) is left out of the step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

RANK, SCALE = 8, 2.0
VARIANTS = (("", "0", "0"), (" +checkpoint", "1", "0"), (" masked prompt", "0", "1"))  # (name, checkpoint, mask)


def token_batches(folder: Path, batch_size: int, steps: int, mask_prompt: bool, seed: int = 0) -> list[list]:
    """`steps` batches of encoded examples (ids and loss weights), made by our encoder from generated
    prompt/completion records."""
    import random

    from finetune_json import example

    import mlx_gemma3
    from mlx_gemma3.train.data import Encoder

    _, processor = mlx_gemma3.load(folder)
    encoder, rng = Encoder(processor, mask_prompt=mask_prompt), random.Random(seed)
    return [[encoder.example(example(rng), folder, "bench") for _ in range(batch_size)] for _ in range(steps)]


def counted_span(example) -> tuple[int, int]:
    """(first, last) position whose token counts: every token after the first, or the answer's span."""
    counted = [i for i, w in enumerate(example.weights) if w] or [1]
    return max(counted[0], 1), counted[-1]


def padded(rows: list[list[int]]):
    import mlx.core as mx
    import numpy as np

    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return mx.array(ids)


def ours_step(folder: Path, grad_checkpoint: bool):
    import mlx.core as mx
    import mlx.nn as nn

    import mlx_gemma3
    from mlx_gemma3.train.adapters import AdapterConfig, prepare_for_training
    from mlx_gemma3.train.loss import Batch, default_loss

    model, _ = mlx_gemma3.load(folder, for_training=True)
    prepare_for_training(model, AdapterConfig("lora", -1, RANK, SCALE))
    step = nn.value_and_grad(model, lambda batch: default_loss(model, batch, grad_checkpoint))

    def run(rows):
        ids, weights = padded([r.ids for r in rows]), mx.zeros((len(rows), max(len(r.ids) for r in rows)))
        for i, row in enumerate(rows):
            first, last = counted_span(row)
            weights[i, first : last + 1] = 1
        return step(Batch(ids, weights))

    return model, run


def mlx_lm_step(folder: Path, grad_checkpoint: bool):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.trainer import grad_checkpoint as checkpoint_layers
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(folder))
    model.freeze()
    keys = [
        f"{block}.{name}"
        for block, names in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
        for name in (f"{n}_proj" for n in names)
    ]
    linear_to_lora_layers(model, len(model.layers), {"rank": RANK, "scale": SCALE, "dropout": 0.0, "keys": keys})
    if grad_checkpoint:
        checkpoint_layers(model.layers[0])  # mlx-lm's own switch: it patches the layer class
    step = nn.value_and_grad(model, default_loss)

    def run(rows):
        lengths = mx.array([counted_span(r) for r in rows])
        return step(model, padded([r.ids for r in rows]), lengths)

    return model, run


def worker(engine: str, folder: Path, grad_checkpoint: bool, batches) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim

    model, run = (ours_step if engine == "ours" else mlx_lm_step)(folder, grad_checkpoint)
    optimizer = optim.Adam(learning_rate=1e-4)
    mx.reset_peak_memory()
    times, losses = [], []
    for rows in batches:
        tic = time.perf_counter()
        (loss, _), grads = run(rows)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, loss)
        times.append(time.perf_counter() - tic)
        losses.append(loss.item())
    tokens = sum(len(r.ids) for rows in batches[1:] for r in rows)
    return {
        "step_s": statistics.median(times[1:]),
        "tokens_per_s": tokens / sum(times[1:]),
        "peak_gb": mx.get_peak_memory() / 1e9,
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gemma3-bench"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "finetune.json")
    parser.add_argument(
        "--worker",
        nargs=5,
        metavar=("ENGINE", "FOLDER", "CHECKPOINT", "MASK", "TOKENIZER_FOLDER"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.worker:
        engine, folder, checkpoint, mask, tokenizer_folder = args.worker  # both engines: our encoder's batches
        batches = token_batches(Path(tokenizer_folder), args.batch_size, args.steps, mask == "1")
        print(json.dumps(worker(engine, Path(folder), checkpoint == "1", batches)))
        return
    from prepare import prepare

    folders = prepare(args.work, ["float32"], ["ours", "mlx_lm"])["float32"]
    results = {}
    for suffix, checkpoint, mask in VARIANTS:
        for engine in ("ours", "mlx_lm"):
            cmd = [
                sys.executable,
                __file__,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--worker",
                engine,
                str(folders[engine]),
                checkpoint,
                mask,
                str(folders["ours"]),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[f"{engine}{suffix}"] = json.loads(out.strip().splitlines()[-1])
            print(f"{engine}{suffix}: {results[f'{engine}{suffix}']['step_s']:.1f} s per step", flush=True)
    print(f"{'run':<22}{'step s':>9}{'tokens/s':>10}{'peak GB':>9}{'first loss':>12}")
    for name, r in results.items():
        print(f"{name:<22}{r['step_s']:>9.3f}{r['tokens_per_s']:>10.1f}{r['peak_gb']:>9.2f}{r['losses'][0]:>12.4f}")
    for suffix, _, _ in VARIANTS:
        ours, theirs = results[f"ours{suffix}"], results[f"mlx_lm{suffix}"]
        print(
            f"ours / mlx-lm{suffix}: step time {ours['step_s'] / theirs['step_s']:.2f}x, "
            f"peak memory {ours['peak_gb'] / theirs['peak_gb']:.2f}x"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"steps": args.steps, "batch_size": args.batch_size, "rank": RANK, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
