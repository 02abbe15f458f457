"""python -m mlx_gemma3.lora / .fuse end to end: a tiny model learns question/answer pairs it could not answer,
read back through generate --adapter-path and from the fused folder; bad data stops before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import import_module

import pytest

from mlx_gemma3 import fuse, lora

generate = import_module("mlx_gemma3.generate")  # the package's `generate` attribute is the function

PAIRS = [
    ("What is the capital of Zorbia?", "Plink"),
    ("Who wrote the blue book?", "Mara"),
    ("How many moons has Tor?", "Seven"),
    ("What colour is a glim?", "Green"),
]


def write_data(folder, pairs=PAIRS):
    folder.mkdir(exist_ok=True)
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) for q, a in pairs]
    for split in ("train", "valid", "test"):
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def answers(capsys, model, *extra: str) -> list[str]:
    """The greedy reply to each question (generate's command line, in this process)."""
    replies = []
    for question, _ in PAIRS:
        assert generate.main(["--model", str(model), "--prompt", question, "--max-tokens", "6", "--verbose", "false", *extra]) == 0
        replies.append(capsys.readouterr().out.strip())
    return replies


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_tiny_model_learns_the_answers(tiny_chat_model, tmp_path, capsys, kind):
    model = tiny_chat_model[0]
    expected = [answer for _, answer in PAIRS]
    assert not set(answers(capsys, model)) & set(expected)
    config = tmp_path / "config.yaml"  # the full run takes its settings from a YAML file, as mlx-lm's --config
    config.write_text(f"fine_tune_type: {kind}\nnum_layers: -1\nlearning_rate: 3.0e-3\nlora_parameters:\n  rank: 8\n  scale: 2.0\n")
    flags = ["--config", str(config)] if kind == "full" else ["--fine-tune-type", "lora", "--num-layers", "-1",
                                                               "--learning-rate", "1e-2", "--rank", "8", "--scale", "2"]
    code = lora.main([
        "--model", str(model), "--train", "--test", "--data", str(write_data(tmp_path / "data")), "--iters", "30",
        "--batch-size", "4", "--mask-prompt", "--steps-per-report", "10", "--steps-per-eval", "30",
        "--adapter-path", str(tmp_path / "adapters"), *flags,
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Iter 30: Train loss" in out and "Val loss" in out and "Peak mem" in out
    assert float(out.split("Test loss ")[1].split(",")[0]) < 0.1
    assert answers(capsys, model, "--adapter-path", str(tmp_path / "adapters")) == expected
    assert fuse.main(["--model", str(model), "--adapter-path", str(tmp_path / "adapters"), "--save-path", str(tmp_path / "fused")]) == 0
    capsys.readouterr()
    assert answers(capsys, tmp_path / "fused") == expected
    if kind == "lora":
        assert server_answer(model, tmp_path / "adapters", PAIRS[2][0]) == PAIRS[2][1]


def server_answer(model, adapters, question: str) -> str:
    """The reply of a real `mlx_gemma3.server --adapter-path` process, asked through the openai client."""
    import openai

    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_gemma3.server", "--model", str(model), "--adapter-path", str(adapters), "--port", "0"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        line = process.stderr.readline()
        assert line.startswith("serving"), line
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}], max_tokens=6)
        return reply.choices[0].message.content.strip()
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_bad_data_stops_before_training(tiny_chat_model, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    with open(data / "valid.jsonl", "a") as f:
        f.write('{"prompt": "no completion"}\n')
    code = lora.main(["--model", str(tiny_chat_model[0]), "--train", "--data", str(data),
                      "--adapter-path", str(tmp_path / "adapters")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and f"{data / 'valid.jsonl'}:5:" in err
    assert not (tmp_path / "adapters").exists()


def test_adapter_path_errors_are_one_line(tiny_chat_model, tmp_path, capsys):
    code = generate.main(["--model", str(tiny_chat_model[0]), "--prompt", "hi", "--adapter-path", str(tmp_path)])
    assert code == 1
    assert "no adapter_config.json" in capsys.readouterr().err
