"""python -m mlx_gemma3.lora / .fuse end to end: a tiny model learns question/answer pairs it could not answer,
read back through generate --adapter-path and from the fused folder; bad data stops before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_cli

import mlx_gemma3
from mlx_gemma3 import fuse, lora

PAIRS = [
    ("What is the capital of Zorbia?", "Plink"),
    ("Who wrote the blue book?", "Mara"),
    ("How many moons has Tor?", "Seven"),
    ("What colour is a glim?", "Green"),
]


def write_data(folder, pairs=PAIRS):
    folder.mkdir(exist_ok=True)
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for q, a in pairs
    ]
    for split in ("train", "valid", "test"):
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def answers(model, adapter_path=None) -> list[str]:
    """The greedy reply to each question, as `generate --prompt` asks it (one user turn, chat template)."""
    loaded, processor = mlx_gemma3.load(model, adapter_path=adapter_path)
    return [mlx_gemma3.generate(loaded, processor, question, max_tokens=6).strip() for question, _ in PAIRS]


def cli_answer(model, *extra: str) -> str:
    """generate's command line (a child process: importing mlx_gemma3.generate here would shadow the function)."""
    result = run_cli(
        "mlx_gemma3.generate",
        "--model",
        str(model),
        "--prompt",
        PAIRS[0][0],
        "--max-tokens",
        "6",
        "--verbose",
        "false",
        *extra,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_tiny_model_learns_the_answers(tiny_chat_model, tmp_path, capsys, kind):
    model = tiny_chat_model[0]
    expected = [answer for _, answer in PAIRS]
    assert not set(answers(model)) & set(expected)
    config = tmp_path / "config.yaml"  # the full run takes its settings from a YAML file, as mlx-lm's --config
    config.write_text(
        f"fine_tune_type: {kind}\nnum_layers: -1\nlearning_rate: 3.0e-3\nlora_parameters:\n  rank: 8\n  scale: 2.0\n"
    )
    flags = (
        ["--config", str(config)]
        if kind == "full"
        else [
            "--fine-tune-type",
            "lora",
            "--num-layers",
            "-1",
            "--learning-rate",
            "1e-2",
            "--rank",
            "8",
            "--scale",
            "2",
        ]
    )
    code = lora.main(
        [
            "--model",
            str(model),
            "--train",
            "--test",
            "--data",
            str(write_data(tmp_path / "data")),
            "--iters",
            "30",
            "--batch-size",
            "4",
            "--mask-prompt",
            "--steps-per-report",
            "10",
            "--steps-per-eval",
            "30",
            "--adapter-path",
            str(tmp_path / "adapters"),
            *flags,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Iter 30: Train loss" in out and "Val loss" in out and "Peak mem" in out
    assert float(out.split("Test loss ")[1].split(",")[0]) < 0.1
    assert answers(model, tmp_path / "adapters") == expected
    assert (
        fuse.main(
            [
                "--model",
                str(model),
                "--adapter-path",
                str(tmp_path / "adapters"),
                "--save-path",
                str(tmp_path / "fused"),
            ]
        )
        == 0
    )
    assert answers(tmp_path / "fused") == expected
    if kind == "lora":  # the command lines: generate and a real server process, each with --adapter-path
        assert cli_answer(model, "--adapter-path", str(tmp_path / "adapters")) == PAIRS[0][1]
        assert server_answer(model, tmp_path / "adapters", PAIRS[2][0]) == PAIRS[2][1]


def server_answer(model, adapters, question: str) -> str:
    """The reply of a real `mlx_gemma3.server --adapter-path` process, asked through the openai client."""
    import openai

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_gemma3.server",
            "--model",
            str(model),
            "--adapter-path",
            str(adapters),
            "--port",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        line = process.stderr.readline()
        assert line.startswith("serving"), line
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": question}], max_tokens=6
        )
        return reply.choices[0].message.content.strip()
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_bad_data_stops_before_training(tiny_chat_model, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    with open(data / "valid.jsonl", "a") as f:
        f.write('{"prompt": "no completion"}\n')
    code = lora.main(
        [
            "--model",
            str(tiny_chat_model[0]),
            "--train",
            "--data",
            str(data),
            "--adapter-path",
            str(tmp_path / "adapters"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and f"{data / 'valid.jsonl'}:5:" in err
    assert not (tmp_path / "adapters").exists()


def test_adapter_path_errors_are_one_line(tiny_chat_model, tmp_path):
    with pytest.raises(mlx_gemma3.Gemma3Error, match="no adapter_config.json"):
        mlx_gemma3.load(tiny_chat_model[0], adapter_path=tmp_path)


@pytest.mark.slow
def test_adapter_path_error_on_the_command_line(tiny_chat_model, tmp_path):
    result = run_cli(
        "mlx_gemma3.generate", "--model", str(tiny_chat_model[0]), "--prompt", "hi", "--adapter-path", str(tmp_path)
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "no adapter_config.json" in result.stderr
