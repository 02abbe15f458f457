"""Distributed inference: two real processes over MLX's ring backend on loopback, against one process and transformers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    TINY_IMAGE_TOKENS,
    TINY_TEXT,
    TINY_VISION,
    convert,
    log_softmax,
    random_ids,
    reference_logits,
    reference_torch,
    tiny_multimodal_model,
    tiny_text_model,
)

WORKER = Path(__file__).parent / "distributed_worker.py"
NEW_TOKENS = 100
PROMPT_LENGTH = 40  # longer than the tiny sliding window (16)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_ranks(
    tmp_path: Path,
    command: list[str],
    ranks: int = 2,
    logs: bool = False,
    stdin: Path | int | None = None,
    env: dict | None = None,
) -> list[subprocess.Popen]:
    """`command` started once per rank with a ring hostfile on 127.0.0.1, as mlx.launch would start it; rank 0
    reads `stdin` (a file, or subprocess.PIPE) when given; `env`: more environment variables."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(ranks)]))
    processes = []
    for rank in range(ranks):
        variables = {
            **os.environ,
            **(env or {}),
            "OMP_NUM_THREADS": "1",
            "MLX_HOSTFILE": str(hostfile),
            "MLX_RANK": str(rank),
        }
        err = open(tmp_path / f"rank{rank}.err", "w")  # a file: MLX's ring may write many lines when a peer dies
        source = subprocess.DEVNULL
        if stdin is not None and rank == 0:
            source = open(stdin) if isinstance(stdin, Path) else stdin
        processes.append(
            subprocess.Popen(command, env=variables, stdin=source, stdout=subprocess.PIPE, stderr=err, text=True)
        )
    return processes


@contextmanager
def running_ranks(tmp_path: Path, command: list[str], **options) -> Iterator[list[subprocess.Popen]]:
    """start_ranks(...), every rank killed on the way out (a failed assertion leaves no process behind)."""
    processes = start_ranks(tmp_path, command, **options)
    try:
        yield processes
    finally:
        for process in processes:
            process.kill()
            process.wait()


def kill_rank(processes: list[subprocess.Popen], victim: int, timeout: float) -> tuple[int, float]:
    """SIGKILL rank `victim` of two: (the other rank's exit status, the seconds it took to exit)."""
    processes[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    code = processes[1 - victim].wait(timeout=timeout)
    return code, time.monotonic() - killed_at


def run_ranks(tmp_path: Path, command: list[str], ranks: int = 2, timeout: int = 120) -> list[str]:
    processes = start_ranks(tmp_path, command, ranks)
    outputs = []
    for rank, process in enumerate(processes):
        out, _ = process.communicate(timeout=timeout)
        err = (tmp_path / f"rank{rank}.err").read_text()
        assert process.returncode == 0, f"rank {rank} failed:\n{err[-3000:]}"
        outputs.append(out)
    return outputs


def run_worker(tmp_path: Path, model: Path, mode: str, prompt: list[int], image: Path | None = None) -> list[dict]:
    out = tmp_path / f"{mode}"
    extra = [str(image)] if image is not None else []
    run_ranks(
        tmp_path, [sys.executable, str(WORKER), str(model), mode, str(out), json.dumps(prompt), str(NEW_TOKENS), *extra]
    )
    return [dict(np.load(f"{out}.rank{rank}.npz")) for rank in range(2)]


def single_process(model_dir: Path, prompt: list[int], features_from: Path | None = None):
    """Logits of the prompt and the greedy continuation in this process (no distribution)."""
    import mlx.core as mx

    import mlx_gemma3
    from mlx_gemma3.generation.text_stream import Options, generate_ids

    model, processor = mlx_gemma3.load(model_dir)
    features = None if features_from is None else model.encode_images(mx.array(np.load(features_from)))
    logits = model(mx.array([prompt]), image_features=features) if features is not None else model(mx.array([prompt]))
    logits = np.array(logits.astype(mx.float32))
    tokens = [
        r.token for r in generate_ids(model, processor, prompt, None, Options.of({"max_tokens": NEW_TOKENS}), features)
    ]
    return logits, tokens


@pytest.fixture(scope="module")
def text_models(converted_tiny):
    """A tiny model (6 layers, sliding and full, GQA), its float and 4-bit conversions, a prompt past the window,
    and transformers' logits and greedy continuation."""
    torch = reference_torch()
    tiny = converted_tiny(seed=5)
    reference = tiny.reference
    prompt = random_ids(PROMPT_LENGTH, seed=7)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor(prompt), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return {
        "float": tiny.folder,
        "4bit": converted_tiny(seed=5, convert_args=("--q-bits", "4", "--q-group-size", "32")).folder,
        "prompt": prompt[0].tolist(),
        "logits": reference_logits(reference, prompt)[0],
        "tokens": out[0, PROMPT_LENGTH:].tolist(),
    }


def weight_bytes(folder: Path) -> int:
    import mlx.core as mx

    return sum(v.nbytes for v in mx.load(str(folder / "model.safetensors")).values())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
@pytest.mark.parametrize("weights", ["float", "4bit"])
def test_two_ranks_match_one_process(tmp_path, text_models, mode, weights):
    folder, prompt = text_models[weights], text_models["prompt"]
    ranks = run_worker(tmp_path, folder, mode, prompt)
    logits, tokens = single_process(folder, prompt)
    if weights == "float":  # the one-process run itself against transformers
        np.testing.assert_allclose(log_softmax(logits[0]), log_softmax(text_models["logits"]), atol=1e-4)
        assert tokens == text_models["tokens"]
    total = weight_bytes(folder)
    for rank, result in enumerate(ranks):
        np.testing.assert_allclose(result["logits"], logits, atol=1e-4, err_msg=f"rank {rank}")
        assert result["tokens"].tolist() == tokens, f"rank {rank}"
        share = int(result["held"]) / total
        print(
            f"{mode} {weights} rank {rank}: {int(result['held'])} of {total} weight bytes ({share:.0%}); "
            f"active memory after load {int(result['active'])} bytes"
        )
        assert 0.4 < share < 0.6
        assert int(result["active"]) < 1.05 * int(result["held"]) + 4096  # nothing else resident after loading
    if mode == "pipeline":
        assert sum(int(r["held"]) for r in ranks) == total  # every tensor on exactly one rank


@pytest.mark.slow
def test_tensor_with_one_kv_head(tmp_path):
    """Fewer KV heads than ranks (Gemma 3 270M and 1B have one): each rank keeps the KV head its query heads read."""
    torch = reference_torch()
    reference = tiny_text_model(seed=9, num_key_value_heads=1)
    reference.save_pretrained(tmp_path / "hf")
    folder = convert(tmp_path / "hf", tmp_path / "mlx")
    prompt = random_ids(PROMPT_LENGTH, seed=4)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor(prompt), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    expected = log_softmax(reference_logits(reference, prompt)[0])
    for rank, result in enumerate(run_worker(tmp_path, folder, "tensor", prompt[0].tolist())):
        np.testing.assert_allclose(log_softmax(result["logits"][0]), expected, atol=1e-4, err_msg=f"rank {rank}")
        assert result["tokens"].tolist() == out[0, PROMPT_LENGTH:].tolist(), f"rank {rank}"


@pytest.mark.slow
def test_pipeline_with_an_image(tmp_path):
    """The vision tower runs on stage 0; later stages get the image's hidden states through the pipeline."""
    hf = tiny_multimodal_model(seed=8, image_tokens=TINY_IMAGE_TOKENS)
    hf.save_pretrained(tmp_path / "hf")
    folder = convert(tmp_path / "hf", tmp_path / "mlx")
    pixels = tmp_path / "pixels.npy"
    size = TINY_VISION["image_size"]
    np.save(pixels, np.random.RandomState(1).uniform(-1, 1, (1, size, size, 3)).astype(np.float32))
    image = [
        TINY_IMAGE_TOKENS["boi_token_index"],
        *[TINY_IMAGE_TOKENS["image_token_index"]] * 4,
        TINY_IMAGE_TOKENS["eoi_token_index"],
    ]
    prompt = [2, *random_ids(6, vocab=500, seed=2)[0].tolist(), *image, *random_ids(20, vocab=500, seed=3)[0].tolist()]
    ranks = run_worker(tmp_path, folder, "pipeline", prompt, pixels)
    logits, tokens = single_process(folder, prompt, pixels)
    torch = reference_torch()
    with torch.no_grad():  # the one-process run against transformers, images included
        image_tokens = torch.tensor([[int(t == TINY_IMAGE_TOKENS["image_token_index"]) for t in prompt]])
        expected = hf(
            input_ids=torch.tensor([prompt]),
            pixel_values=torch.tensor(np.load(pixels)).permute(0, 3, 1, 2),
            token_type_ids=image_tokens,
        ).logits
    np.testing.assert_allclose(log_softmax(logits[0]), log_softmax(expected[0].float().numpy()), atol=1e-4)
    for rank, result in enumerate(ranks):
        np.testing.assert_allclose(result["logits"], logits, atol=1e-4, err_msg=f"rank {rank}")
        assert result["tokens"].tolist() == tokens, f"rank {rank}"


def generate_command(folder: Path, mode: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlx_gemma3.generate",
        "--model",
        str(folder),
        "--prompt",
        "hello there",
        "--no-chat-template",
        "--distributed",
        mode,
        *extra,
    ]


@pytest.mark.slow
def test_generate_cli_with_mlx_launch(tiny_chat_model, tmp_path):
    """The command users run: only rank 0 prints, the text is the one-process text, each rank's bytes are shown."""
    folder = tiny_chat_model[0]
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_gemma3.generate",
            "--model",
            str(folder),
            "--prompt",
            "hello there",
            "--no-chat-template",
            "-m",
            "30",
            "--verbose",
            "false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert single.returncode == 0, single.stderr
    port = free_ports(1)[0]
    launched = subprocess.run(
        [
            str(Path(sys.executable).parent / "mlx.launch"),
            "--backend",
            "ring",
            "-n",
            "2",
            "--starting-port",
            str(port),
            "--",
            *generate_command(folder, "tensor", "-m", "30"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert single.stdout.strip() and launched.stdout == single.stdout  # rank 0's text, printed once
    assert launched.stderr.count("Generation: 30 tokens") == 1
    assert "Text weights held: rank 0:" in launched.stderr and "rank 1:" in launched.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode, victim", [("pipeline", 1), ("tensor", 0), ("pipeline", 0)])
def test_a_killed_rank_ends_the_other(tiny_chat_model, tmp_path, mode, victim):
    """Mid-generation SIGKILL of one rank: the other exits non-zero with one clear line, within seconds (MLX's
    error at once when its send fails, else the stall guard's 20 s)."""
    with running_ranks(tmp_path, generate_command(tiny_chat_model[0], mode, "-m", "-1")) as processes:
        assert len(processes[0].stdout.read(20)) == 20  # rank 0 is printing the reply
        code, waited = kill_rank(processes, victim, timeout=40)
    err = (tmp_path / f"rank{1 - victim}.err").read_text()
    assert code != 0
    assert "error: another rank stopped" in err or "no progress for 20 s: another rank stopped" in err
    assert waited < 25


def test_stages_hold_about_the_same_bytes():
    from mlx_gemma3.distributed.pipeline import stage_bounds

    assert stage_bounds([10] * 6, 10, 2) == [(0, 3), (3, 6)]  # rank 0 also holds the embedding: 40 and 30
    assert stage_bounds([10] * 8, 20, 2) == [(0, 3), (3, 8)]  # 50 and 50
    assert stage_bounds([10] * 3, 100, 3) == [(0, 1), (1, 2), (2, 3)]  # every rank keeps at least one layer


def test_bad_distributed_requests_are_one_clear_error(tmp_path):
    from types import SimpleNamespace

    import mlx_gemma3
    from mlx_gemma3 import Gemma3Error
    from mlx_gemma3.distributed.pipeline import stage_bounds
    from mlx_gemma3.distributed.tensor import check_divisible

    with pytest.raises(Gemma3Error, match="splits 2 decoder layers across 3 ranks"):
        stage_bounds([1, 1], 1, 3)
    tiny = SimpleNamespace(**TINY_TEXT)
    with pytest.raises(Gemma3Error, match="the 2 key/value heads to split across 3 ranks"):
        check_divisible(
            SimpleNamespace(**{**TINY_TEXT, "num_attention_heads": 6, "intermediate_size": 126, "vocab_size": 513}),
            3,
            None,
        )
    with pytest.raises(Gemma3Error, match="the 4 attention heads across 3 ranks"):
        check_divisible(tiny, 3, None)
    with pytest.raises(Gemma3Error, match="not a multiple of the quantization group 64"):
        check_divisible(tiny, 2, {"group_size": 64, "bits": 4})
    check_divisible(tiny, 2, {"group_size": 32, "bits": 4})  # the tiny model's 4-bit test conversion
    with pytest.raises(Gemma3Error, match="distributed must be one of pipeline, tensor"):
        mlx_gemma3.load(tmp_path, distributed="data")


@pytest.mark.parametrize("command", ["chat", "server"])
def test_chat_and_server_refuse_what_runs_in_one_process_only(command, capsys):
    import importlib

    main = importlib.import_module(f"mlx_gemma3.{command}").main
    assert main(["--distributed", "pipeline", "--prompt-lookup", "3"]) == 1
    assert f"error: {command} --distributed does not take --prompt-lookup" in capsys.readouterr().err
