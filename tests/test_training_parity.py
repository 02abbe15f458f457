"""Training against mlx-lm's own trainer (mlx-lm 0.32.2, the test extra): the same flags on the same tiny model and
data learn the same (validation loss, answers), the tokens counted and the batches are mlx-lm's, and a few optimizer
steps with a warmup + cosine schedule give mlx-lm's learning rates, losses and parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_gemma3
from mlx_gemma3 import lora
from mlx_gemma3.loader import load
from mlx_gemma3.train.adapters import AdapterConfig, prepare_for_training
from mlx_gemma3.train.data import Encoder, collate, read_jsonl, training_batch
from mlx_gemma3.train.trainer import TrainingArgs, learning_rate_schedule, make_optimizer, train

# Six pairs with a batch of four: mlx-lm trains one whole batch (the first four) and leaves the last two out.
PAIRS = [
    ("What is the capital of Zorbia?", "Plink"),
    ("Who wrote the blue book?", "Mara"),
    ("How many moons has Tor?", "Seven"),
    ("What colour is a glim?", "Green"),
    ("Where does the river Qel end?", "Lake Orm"),
    ("What does a vorn eat?", "Stones"),
]
FLAGS = ["--fine-tune-type", "lora", "--num-layers", "-1", "--batch-size", "4", "--learning-rate", "5e-3"]


def records(pairs=PAIRS) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def write_data(folder: Path, pairs=PAIRS) -> Path:
    folder.mkdir(exist_ok=True)
    for split in ("train", "valid", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(pairs)))
    return folder


def mlx_lm_validation(model_folder: Path, adapters: Path) -> tuple[float, list[str]]:
    """mlx-lm's own evaluation of an adapter folder (its evaluate() on valid.jsonl, --mask-prompt) and the greedy
    answers its generate() gives with the adapters."""
    import mlx_lm
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import evaluate

    model, tokenizer = mlx_lm.load(str(model_folder), adapter_path=str(adapters))
    loss = evaluate(model, CacheDataset(ChatDataset(records(), tokenizer, mask_prompt=True)), 4, -1)
    answers = []
    for question, _ in PAIRS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        answers.append(mlx_lm.generate(model, tokenizer, prompt, max_tokens=6, verbose=False))
    return loss, answers


@pytest.mark.slow
def test_the_same_flags_learn_as_mlx_lm_lora(tiny_chat_model, tmp_path, capsys):
    """`mlx_lm lora` and ours with mlx-lm's flags and seed: after 15 steps the validation loss (mlx-lm's evaluate on
    both adapter folders) agrees within 2 % and both give the same greedy answers, the trained four right."""
    model = tiny_chat_model[0]
    data = write_data(tmp_path / "data")
    flags = [*FLAGS, "--model", str(model), "--train", "--data", str(data), "--iters", "15", "--mask-prompt"]
    theirs = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "lora", *flags, "--adapter-path", str(tmp_path / "theirs")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    assert lora.main([*flags, "--adapter-path", str(tmp_path / "ours")]) == 0
    assert "the last 2 (from" in capsys.readouterr().err  # the two pairs past the whole batch are named
    their_loss, their_answers = mlx_lm_validation(model, tmp_path / "theirs")
    our_loss, our_answers = mlx_lm_validation(model, tmp_path / "ours")
    assert abs(our_loss - their_loss) <= 0.02 * their_loss, (our_loss, their_loss)
    assert our_answers == their_answers
    assert [answer.split("<")[0] for answer in our_answers[:4]] == [a for _, a in PAIRS[:4]]


def test_counted_tokens_and_batches_are_mlx_lm_s(tiny_chat_model, tmp_path):
    """Our batch of a step counts exactly the targets mlx-lm's default_loss masks in (--mask-prompt: the reply, its
    <end_of_turn>\\n and the padding token after it), and the left-over pairs never form a batch."""
    import mlx_lm
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import iterate_batches

    _, tokenizer = mlx_lm.load(str(tiny_chat_model[0]))
    (batch, lengths) = next(iterate_batches(CacheDataset(ChatDataset(records(), tokenizer, mask_prompt=True)), 4, 2048))
    steps = np.arange(1, batch.shape[1])
    their_mask = (steps >= np.array(lengths)[:, :1]) & (steps <= np.array(lengths)[:, 1:])
    _, processor = mlx_gemma3.load(tiny_chat_model[0])
    examples = read_jsonl(write_data(tmp_path / "data") / "train.jsonl", Encoder(processor, mask_prompt=True))
    ours = training_batch(examples, 4, 0, 0)
    width = ours.ids.shape[1]
    assert np.array_equal(np.array(ours.ids), np.array(batch)[:, :width])
    assert np.array_equal(np.array(ours.weights)[:, 1:] > 0, their_mask[:, : width - 1])
    assert not their_mask[:, width - 1 :].any()
    first = np.array(collate(examples[:4]).ids)
    assert all(np.array_equal(training_batch(examples, 4, seed, step).ids, first) for seed in (0, 1) for step in (1, 5))


SCHEDULE = {"name": "cosine_decay", "arguments": [1e-3, 6], "warmup": 2, "warmup_init": 0.0}


def test_learning_rates_follow_mlx_lm_s_schedules():
    """mlx-lm's schedule dict and our --lr-schedule cosine --warmup give, step by step, the rates mlx-lm's
    build_schedule gives (its warmup joins the decay at step warmup + 1)."""
    from mlx_lm.tuner.utils import build_schedule

    shorthand = TrainingArgs(iters=10, learning_rate=2e-4, lr_schedule="cosine", warmup=3)
    as_mlx_lm = {"name": "cosine_decay", "arguments": [2e-4, 7], "warmup": 3}
    for ours, theirs in [
        (TrainingArgs(iters=6, lr_schedule=SCHEDULE), SCHEDULE),
        (shorthand, as_mlx_lm),
        (TrainingArgs(iters=6, lr_schedule={"name": "exponential_decay", "arguments": [1e-3, 0.5]}), None),
    ]:
        theirs = build_schedule(theirs or ours.lr_schedule)
        schedule = learning_rate_schedule(ours)
        rates = [schedule(mx.array(step)).item() for step in range(ours.iters + 2)]
        assert np.allclose(rates, [theirs(mx.array(step)).item() for step in range(ours.iters + 2)], rtol=1e-6)


@pytest.mark.slow
def test_optimizer_steps_match_mlx_lm_s_trainer(tiny_chat_model, tmp_path):
    """Six steps of mlx-lm's train() and of ours, same model, adapters (same seed), data, Adam and warmup + cosine
    schedule: the same loss each step, the same learning rates, parameters within 1e-5."""
    import mlx_lm
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs as TheirArgs
    from mlx_lm.tuner.trainer import TrainingCallback
    from mlx_lm.tuner.trainer import train as their_train
    from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers

    class Reports(TrainingCallback):
        def __init__(self):
            self.rows = []

        def on_train_loss_report(self, info):
            self.rows.append((info["train_loss"], info["learning_rate"]))

    folder, pairs = tiny_chat_model[0], PAIRS[:4]
    theirs, tokenizer = mlx_lm.load(str(folder))
    mx.random.seed(0)
    theirs.freeze()
    linear_to_lora_layers(theirs, -1, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    reports = Reports()
    their_args = TheirArgs(batch_size=4, iters=6, steps_per_report=1, adapter_file=str(tmp_path / "a.safetensors"))
    dataset = CacheDataset(ChatDataset(records(pairs), tokenizer, mask_prompt=True))
    optimizer = optim.Adam(learning_rate=build_schedule(SCHEDULE))
    their_train(theirs, optimizer, dataset, None, their_args, training_callback=reports)

    ours, processor = load(folder, for_training=True)
    mx.random.seed(0)
    prepare_for_training(ours, AdapterConfig("lora", -1, 8, 20.0, 0.0))
    args = TrainingArgs(batch_size=4, iters=6, lr_schedule=SCHEDULE, steps_per_report=1, adapter_path=tmp_path / "o")
    examples = read_jsonl(write_data(tmp_path / "data", pairs) / "train.jsonl", Encoder(processor, mask_prompt=True))
    rates = []
    losses = train(ours, make_optimizer(args), examples, None, args, {}, report=lambda e: rates.append(e))
    rates = [e["learning_rate"] for e in rates if e["kind"] == "train"]
    assert np.allclose(losses, [loss for loss, _ in reports.rows], rtol=1e-5)
    assert np.allclose(rates, [rate for _, rate in reports.rows], rtol=1e-6)
    expected = dict(tree_flatten(theirs.trainable_parameters()))
    for name, value in tree_flatten(ours.trainable_parameters()):
        assert mx.abs(value - expected[name]).max().item() <= 1e-5, name


def test_help_names_where_training_differs_from_mlx_lm(capsys):
    with pytest.raises(SystemExit):
        lora.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "mlx-lm" in text and "left out" in text and "differ in" in text


def test_an_mlx_lm_yaml_recipe_reads_as_mlx_lm_writes_it(tmp_path):
    """mlx-lm's YAML names for the schedule and the optimizer's settings are taken as they are; a schedule that is
    neither a shorthand nor mlx-lm's form is one clear error."""
    from mlx_gemma3.errors import Gemma3Error
    from mlx_gemma3.train.trainer import make_optimizer as optimizer_of

    config = tmp_path / "recipe.yaml"
    config.write_text(
        "optimizer: adamw\noptimizer_config:\n  adamw:\n    weight_decay: 0.05\n"
        "lr_schedule:\n  name: cosine_decay\n  arguments: [1.0e-4, 200, 1.0e-6]\n  warmup: 10\n  warmup_init: 1.0e-6\n"
    )
    values = lora.settings(lora.build_parser().parse_args(["--config", str(config), "--iters", "200"]))
    args = lora.training_args(values)
    assert args.schedule() == {
        "name": "cosine_decay",
        "arguments": [1e-4, 200, 1e-6],
        "warmup": 10,
        "warmup_init": 1e-6,
    }
    made = optimizer_of(args, values["optimizer"], values["optimizer_config"][values["optimizer"]])
    assert isinstance(made, optim.AdamW) and made.weight_decay == 0.05
    with pytest.raises(Gemma3Error, match="name is one of cosine_decay"):
        TrainingArgs(lr_schedule={"name": "warmup_cosine", "arguments": [1e-4]}).check()
