"""Fine-tune the demo Gemma 3 270M (a base model) to turn order sentences into one fixed JSON format with LoRA.

Generates a few hundred examples, measures validation loss and exact-match accuracy on held-out sentences before
and after training, and leaves the adapters (and their fused model) in --out. On this repository's CPU runner (from
the float32 folder benchmarks/prepare.py makes) it takes about an hour; on an Apple Silicon Mac, minutes. Figures: docs/benchmarks.md, "Fine-tuning"."""

import argparse
import json
import random
import time
from pathlib import Path

import mlx_gemma3
from mlx_gemma3 import fuse, lora
from mlx_gemma3.train.data import Encoder, load_splits
from mlx_gemma3.train.trainer import evaluate

ITEMS = [
    "blue widgets",
    "steel bolts",
    "paper cups",
    "oak chairs",
    "glass jars",
    "red lamps",
    "wool socks",
    "brass keys",
]
CITIES = ["Lyon", "Busan", "Quito", "Tromsø", "Osaka", "Accra", "Perth", "Leeds", "Tucson", "Graz"]
TEMPLATES = [
    "Order {order}: {qty} {item} shipped to {city} on {date}.",
    "On {date} we sent {qty} {item} to {city} (order #{order}).",
    "{city} received {qty} {item} on {date}, order number {order}.",
    "Shipment for order {order} left on {date}: {qty} {item}, destination {city}.",
]
INSTRUCTION = "Extract the order as JSON:\n"


def example(rng: random.Random) -> dict:
    fields = {
        "order": rng.randint(1000, 9999),
        "qty": rng.randint(1, 50),
        "item": rng.choice(ITEMS),
        "city": rng.choice(CITIES),
        "date": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    }
    sentence = rng.choice(TEMPLATES).format(**fields)
    return {"prompt": INSTRUCTION + sentence, "completion": json.dumps(fields)}


def write_data(folder: Path, counts: dict[str, int], seed: int) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(example(rng)) + "\n" for _ in range(count)))


def accuracy(model_folder, adapter_path, test_file: Path, count: int) -> float:
    """Share of test sentences whose greedy reply (first line) is exactly the expected JSON."""
    model, processor = mlx_gemma3.load(model_folder, adapter_path=adapter_path)
    records = [json.loads(line) for line in test_file.read_text().splitlines()[:count]]
    right = 0
    for record in records:
        messages = [{"role": "user", "content": record["prompt"]}]  # messages: the chat format the data was rendered in
        reply = mlx_gemma3.generate(model, processor, messages, max_tokens=64)
        right += reply.strip() == record["completion"]
    return right / len(records)


def validation_loss(model_folder, adapter_path, data: Path) -> float:
    model, processor = mlx_gemma3.load(model_folder, for_training=True, adapter_path=adapter_path)
    valid = load_splits(data, Encoder(processor, mask_prompt=True), ("valid",))["valid"]
    return evaluate(model, valid, 4, -1)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="the model folder (default: the demo 270M, a 4-bit GGUF import: QLoRA)")
    parser.add_argument("--out", default="finetune_json")
    parser.add_argument("--iters", type=int, default=45)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", default="3e-4")
    parser.add_argument("--test-count", type=int, default=20, help="test sentences to generate for the accuracy")
    parser.add_argument("--valid-count", type=int, default=20, help="validation sentences")
    args = parser.parse_args()
    args.model = args.model or str(mlx_gemma3.demo_model())
    out = Path(args.out)
    data = out / "data"
    write_data(data, {"train": 300, "valid": args.valid_count, "test": 40}, seed=0)
    before = {
        "val_loss": validation_loss(args.model, None, data),
        "accuracy": accuracy(args.model, None, data / "test.jsonl", args.test_count),
    }
    print(f"before: validation loss {before['val_loss']:.3f}, exact JSON {before['accuracy']:.0%}", flush=True)
    tic = time.perf_counter()
    lora.main(
        [
            "--model",
            args.model,
            "--train",
            "--data",
            str(data),
            "--adapter-path",
            str(out / "adapters"),
            "--fine-tune-type",
            "lora",
            "--num-layers",
            "-1",
            "--rank",
            "8",
            "--scale",
            "2",
            "--mask-prompt",
            "--iters",
            str(args.iters),
            "--batch-size",
            str(args.batch_size),
            "--learning-rate",
            args.learning_rate,
            "--lr-schedule",
            "cosine",
            "--warmup",
            "4",
            "--steps-per-report",
            "5",
            "--steps-per-eval",
            str(args.iters),
            "--val-batches",
            "5",
            "--save-every",
            str(args.iters),
        ]
    )
    minutes = (time.perf_counter() - tic) / 60
    after = {
        "val_loss": validation_loss(args.model, out / "adapters", data),
        "accuracy": accuracy(args.model, out / "adapters", data / "test.jsonl", args.test_count),
    }
    print(
        f"after {args.iters} steps ({minutes:.1f} min): validation loss {after['val_loss']:.3f}, "
        f"exact JSON {after['accuracy']:.0%}",
        flush=True,
    )
    fuse.main(["--model", args.model, "--adapter-path", str(out / "adapters"), "--save-path", str(out / "fused")])
    fused = accuracy(out / "fused", None, data / "test.jsonl", args.test_count)
    print(f"fused model: exact JSON {fused:.0%}", flush=True)
    (out / "results.json").write_text(
        json.dumps(
            {
                "before": before,
                "after": after,
                "fused_accuracy": fused,
                "iters": args.iters,
                "batch_size": args.batch_size,
                "learning_rate": args.learning_rate,
                "train_minutes": minutes,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
