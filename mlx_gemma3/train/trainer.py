"""The training loop: steps, learning-rate schedule, reports, validation, atomic saves and exact resume."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import Gemma3Error
from .adapters import load_adapter_weights, save_adapters, save_atomically
from .data import Example, evaluation_batches, training_batch
from .loss import default_loss

__all__ = ["TrainingArgs", "evaluate", "train"]

SCHEDULES = ("constant", "cosine")
STATE_SUFFIX = ".optimizer.safetensors"  # beside adapters.safetensors: the optimizer state and step, for resume


@dataclass
class TrainingArgs:
    """mlx-lm's training settings (iterations count from 1; `iters` is the total, a resumed run included)."""

    batch_size: int = 4
    iters: int = 1000
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"
    warmup: int = 0
    val_batches: int = 25
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    grad_checkpoint: bool = False
    seed: int = 0
    adapter_path: Path = Path("adapters")

    def check(self) -> None:
        if self.lr_schedule not in SCHEDULES:
            raise Gemma3Error(f"unknown --lr-schedule {self.lr_schedule!r}: use one of {', '.join(SCHEDULES)}")
        positive = {
            "batch_size": self.batch_size,
            "iters": self.iters,
            "steps_per_report": self.steps_per_report,
            "steps_per_eval": self.steps_per_eval,
            "save_every": self.save_every,
        }
        for name, value in positive.items():
            if value < 1:
                raise Gemma3Error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.learning_rate <= 0 or self.warmup < 0:
            raise Gemma3Error("--learning-rate must be positive and --warmup not negative")


def learning_rate_schedule(args: TrainingArgs):
    """A constant rate, or a linear warmup from 0 over `warmup` steps then a cosine decay to 0 at `iters`."""
    if args.lr_schedule == "constant":
        return args.learning_rate
    decay = optim.cosine_decay(args.learning_rate, max(args.iters - args.warmup, 1))
    if not args.warmup:
        return decay
    warmup = optim.linear_schedule(0.0, args.learning_rate, args.warmup)
    return optim.join_schedules([warmup, decay], [args.warmup])


def make_optimizer(args: TrainingArgs, name: str = "adam") -> optim.Optimizer:
    kinds = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}
    if name not in kinds:
        raise Gemma3Error(f"unknown optimizer {name!r}: use one of {', '.join(kinds)}")
    return kinds[name](learning_rate=learning_rate_schedule(args))


def state_file(adapter_file: Path) -> Path:
    return adapter_file.with_name(adapter_file.name.removesuffix(".safetensors") + STATE_SUFFIX)


def save_checkpoint(model, optimizer, folder: Path, config_json: dict, step: int) -> Path:
    """adapters.safetensors, adapter_config.json and the optimizer state (for --resume-adapter-file), atomically."""
    adapter_file = save_adapters(model, folder, config_json)
    state = dict(tree_flatten(optimizer.state))
    save_atomically(state_file(adapter_file), state, {"step": str(step)})
    return adapter_file


def resume(model, optimizer, adapter_file: Path) -> int:
    """Load adapter weights and, when saved beside them, the optimizer state; returns the steps already done."""
    adapter_file = Path(adapter_file)
    load_adapter_weights(model, adapter_file)
    saved = state_file(adapter_file)
    if not saved.is_file():
        return 0
    arrays, meta = mx.load(str(saved), format="safetensors", return_metadata=True)
    optimizer.state = tree_unflatten(list(arrays.items()))
    return int(meta.get("step", 0))


def evaluate(model, examples: list[Example], batch_size: int, num_batches: int, loss=default_loss) -> float:
    """Mean loss per counted token over the first num_batches batches (-1: all); `loss(model, batch,
    grad_checkpoint)` returns (mean loss, tokens counted)."""
    total, count = mx.array(0.0), mx.array(0.0)
    for batch in evaluation_batches(examples, batch_size, num_batches):
        value, tokens = loss(model, batch, False)
        total, count = total + value * tokens, count + tokens
        mx.eval(total, count)
    return (total / mx.maximum(count, 1)).item()


def train(
    model: nn.Module,
    optimizer: optim.Optimizer,
    train_set: list[Example],
    val_set: list[Example] | None,
    args: TrainingArgs,
    config_json: dict,
    loss: Callable = default_loss,
    report: Callable[[dict], None] = print,
    start_step: int = 0,
) -> list[float]:
    """Train from step start_step + 1 to args.iters; returns each step's loss. `report` gets a dict per report
    (kind "train" or "val"); adapters are saved every save_every steps and at the end."""
    args.check()
    value_and_grad = nn.value_and_grad(model, lambda batch: loss(model, batch, args.grad_checkpoint))
    losses, window = [], Window()
    model.train()
    for step in range(start_step + 1, args.iters + 1):
        if val_set and (step == start_step + 1 or step % args.steps_per_eval == 0 or step == args.iters):
            report(validation_report(model, val_set, args, loss, step))
        tic = time.perf_counter()
        mx.random.seed(args.seed + step)  # dropout masks depend on the step only: resumed runs repeat them
        (value, tokens), grads = value_and_grad(training_batch(train_set, args.batch_size, args.seed, step - 1))
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, value, tokens)
        losses.append(value.item())
        window.add(losses[-1], tokens.item(), time.perf_counter() - tic)
        if step % args.steps_per_report == 0 or step == args.iters:
            report(window.report(step, optimizer))
            window = Window()
        if step % args.save_every == 0 or step == args.iters:
            path = save_checkpoint(model, optimizer, Path(args.adapter_path), config_json, step)
            report({"kind": "save", "step": step, "path": str(path)})
    return losses


def validation_report(model, val_set: list[Example], args: TrainingArgs, loss, step: int) -> dict:
    tic = time.perf_counter()
    model.eval()
    value = evaluate(model, val_set, args.batch_size, args.val_batches, loss)
    model.train()
    return {"kind": "val", "step": step, "val_loss": value, "val_time": time.perf_counter() - tic}


class Window:
    """Loss, tokens and time summed since the last report."""

    def __init__(self):
        self.loss, self.steps, self.tokens, self.seconds = 0.0, 0, 0, 0.0

    def add(self, loss: float, tokens: float, seconds: float) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1
        self.tokens, self.seconds = self.tokens + int(tokens), self.seconds + seconds

    def report(self, step: int, optimizer) -> dict:
        rate = optimizer.learning_rate
        return {
            "kind": "train",
            "step": step,
            "train_loss": self.loss / self.steps,
            "learning_rate": float(rate.item()),
            "tokens_per_second": self.tokens / max(self.seconds, 1e-9),
            "steps_per_second": self.steps / max(self.seconds, 1e-9),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }


def report_line(event: dict) -> str:
    """One progress line per report, in mlx-lm's wording."""
    if event["kind"] == "val":
        return f"Iter {event['step']}: Val loss {event['val_loss']:.3f}, Val took {event['val_time']:.3f}s"
    if event["kind"] == "save":
        return f"Iter {event['step']}: Saved adapter weights to {event['path']}"
    return (
        f"Iter {event['step']}: Train loss {event['train_loss']:.3f}, Learning Rate {event['learning_rate']:.3e}, "
        f"It/sec {event['steps_per_second']:.3f}, Tokens/sec {event['tokens_per_second']:.3f}, "
        f"Peak mem {event['peak_memory_gb']:.3f} GB"
    )
