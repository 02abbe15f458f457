"""`python -m mlx_gemma3.lora`: fine-tune a Gemma 3 model (LoRA, DoRA or full) on jsonl data, mlx-lm's flags.

Internal: a command line, whose flags are its interface; the Python API is listed in docs/api.md."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .cli import Parser, run
from .errors import Gemma3Error
from .model.sources import model_folder

# mlx-lm's defaults, under the names of its YAML config (and of the flags, with - for _).
DEFAULTS = {
    "model": None,
    "train": False,
    "test": False,
    "data": "data",
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "num_layers": 16,
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "test_batches": 500,
    "learning_rate": 1e-5,
    "lr_schedule": "constant",
    "warmup": 0,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "save_every": 100,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "max_seq_length": 2048,
    "grad_checkpoint": False,
    "mask_prompt": False,
    "seed": 0,
    "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
}
LORA_FLAGS = ("rank", "scale", "dropout", "keys")  # flags that set lora_parameters


def build_parser() -> Parser:
    parser = Parser("lora", description="Fine-tune a Gemma 3 model with LoRA, DoRA or full fine-tuning.")
    add = parser.add_argument
    add("--model", help="model folder, .gguf file or Hugging Face repo id (quantized bases train as QLoRA)")
    add("--train", action="store_true", default=None, help="train (else only --test with existing adapters)")
    add("--data", help="folder with train.jsonl, valid.jsonl (and test.jsonl for --test); default: data")
    add("--fine-tune-type", choices=("lora", "dora", "full"), help="what trains (default lora)")
    add("--optimizer", choices=("adam", "adamw", "sgd"), help="default adam")
    add("--num-layers", type=int, help="train the last N decoder layers (-1: all; default 16)")
    add("--batch-size", type=int, help="examples per step (default 4)")
    add("--iters", type=int, help="training steps in all, a resumed run's included (default 1000)")
    add("--val-batches", type=int, help="validation batches per evaluation (-1: the whole set; default 25)")
    add("--test-batches", type=int, help="test batches (-1: the whole set; default 500)")
    add("--learning-rate", type=float, help="Adam learning rate (default 1e-5)")
    add("--lr-schedule", choices=("constant", "cosine"), help="cosine: warm up over --warmup steps, then decay to 0")
    add("--warmup", type=int, help="warmup steps of the cosine schedule (default 0)")
    add("--steps-per-report", type=int, help="steps between progress lines (default 10)")
    add("--steps-per-eval", type=int, help="steps between validations (default 200)")
    add("--save-every", type=int, help="save the adapters every N steps (default 100)")
    add("--resume-adapter-file", help="continue from this adapters.safetensors (and its saved optimizer state)")
    add("--adapter-path", help="folder to save the adapters in (default: adapters)")
    add("--max-seq-length", type=int, help="longest sequence in tokens; longer text samples are cut (default 2048)")
    add(
        "--grad-checkpoint",
        action="store_true",
        default=None,
        help="recompute activations in the backward pass: less memory, more time",
    )
    add("--mask-prompt", action="store_true", default=None, help="count only the assistant's tokens in the loss")
    add("--test", action="store_true", default=None, help="report the loss on test.jsonl")
    add("--seed", type=int, help="seed for the adapters' initialisation, data order and dropout (default 0)")
    add("--rank", type=int, help="LoRA rank (default 8)")
    add("--scale", type=float, help="LoRA scale, peft's lora_alpha / rank (default 20.0)")
    add("--dropout", type=float, help="LoRA dropout (default 0)")
    add(
        "--keys",
        type=lambda text: text.split(","),
        help="comma-separated layer paths to adapt (default: every attention and MLP projection)",
    )
    add(
        "--config",
        "-c",
        help="YAML file with any of these settings (mlx-lm's names; lora_parameters: rank, scale, dropout, keys)",
    )
    return parser


def settings(args) -> dict:
    """Flags over the YAML config over the defaults."""
    values = json.loads(json.dumps(DEFAULTS))
    values.update(read_config(args.config) if args.config else {})
    lora = values["lora_parameters"]
    for name, value in vars(args).items():
        if value is None or name == "config":
            continue
        if name in LORA_FLAGS:
            lora[name] = value
        else:
            values[name] = value
    return values


def read_config(path: str) -> dict:
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise Gemma3Error(f"cannot read --config {path}: {e}") from None
    if not isinstance(config, dict):
        raise Gemma3Error(f"--config {path} must hold a mapping of settings (mlx-lm's names)")
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise Gemma3Error(f"--config {path}: unknown setting {unknown[0]!r}; known: {', '.join(sorted(DEFAULTS))}")
    if not isinstance(config.get("lora_parameters", {}), dict):
        raise Gemma3Error(f"--config {path}: lora_parameters must be a mapping (rank, scale, dropout, keys)")
    return {**config, "lora_parameters": {**DEFAULTS["lora_parameters"], **config.get("lora_parameters", {})}}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(lambda: fine_tune(settings(args)))


def fine_tune(values: dict) -> int:
    import mlx.core as mx

    from .loader import load
    from .model.quantize import parameter_count
    from .train.adapters import AdapterConfig, apply_adapter_folder, prepare_for_training
    from .train.data import Encoder, load_splits
    from .train.trainer import evaluate, make_optimizer, report_line, resume, train

    if not values["train"] and not values["test"]:
        raise Gemma3Error("nothing to do: pass --train, --test or both")
    folder = model_folder(values["model"])
    mx.random.seed(values["seed"])
    model, processor = load(folder, for_training=True)
    encoder = Encoder(processor, values["mask_prompt"], values["max_seq_length"])
    names = (("train", "valid") if values["train"] else ()) + (("test",) if values["test"] else ())
    data = load_splits(values["data"], encoder, names)
    if encoder.truncated:
        print(
            f"note: {len(encoder.truncated)} sample(s) cut to --max-seq-length {values['max_seq_length']} tokens, "
            f"the first {encoder.truncated[0]}",
            file=sys.stderr,
        )
    args = training_args(values)
    if values["train"]:
        lora = values["lora_parameters"]
        config = AdapterConfig(
            values["fine_tune_type"],
            values["num_layers"],
            int(lora["rank"]),
            float(lora["scale"]),
            float(lora["dropout"]),
            tuple(lora.get("keys") or AdapterConfig.keys),
        )
        parameters = parameter_count(model)  # the model's own, before the adapters go in
        prepare_for_training(model, config)
        optimizer = make_optimizer(args, values["optimizer"])
        start = resume(model, optimizer, Path(values["resume_adapter_file"])) if values["resume_adapter_file"] else 0
        print(trainable_summary(model, parameters), flush=True)
        saved = {
            **{k: v for k, v in values.items() if k != "lora_parameters"},
            "model": str(folder),
            **config.as_json(),
        }
        train(
            model,
            optimizer,
            data["train"],
            data["valid"],
            args,
            saved,
            report=lambda e: print(report_line(e), flush=True),
            start_step=start,
        )
    else:
        apply_adapter_folder(model, values["adapter_path"])
    if values["test"]:
        model.eval()
        loss = evaluate(model, data["test"], args.batch_size, values["test_batches"])
        print(f"Test loss {loss:.3f}, Test ppl {math.exp(min(loss, 700.0)):.3f}.", flush=True)
    return 0


def training_args(values: dict):
    from .train.trainer import TrainingArgs

    names = (
        "batch_size",
        "iters",
        "learning_rate",
        "lr_schedule",
        "warmup",
        "val_batches",
        "steps_per_report",
        "steps_per_eval",
        "save_every",
        "grad_checkpoint",
        "seed",
    )
    args = TrainingArgs(**{name: values[name] for name in names}, adapter_path=Path(values["adapter_path"]))
    args.check()
    return args


def trainable_summary(model, parameters: int) -> str:
    """mlx-lm's line: the trainable share of the model's `parameters` (model.quantize.parameter_count, the count
    the converter prints)."""
    from mlx.utils import tree_flatten

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return (
        f"Trainable parameters: {100 * trainable / max(parameters, 1):.3f}% "
        f"({trainable / 1e6:.3f}M/{parameters / 1e6:.3f}M)"
    )


if __name__ == "__main__":
    from .cli import exit_with

    exit_with(main())
