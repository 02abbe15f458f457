"""The distributed server and chat: two real ranks over MLX's ring backend on loopback, rank 0 serving through the
openai client (or reading the chat's input), each reply equal to the one-process reply."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from test_distributed import kill_rank, running_ranks

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


TEMPERATURE = 1.0  # sampled with a seed: each token depends on the logits being right on every rank


def asks() -> list[dict]:
    """Sampled requests (seeded) of different lengths, one with stop strings, and a greedy one."""
    out = [
        dict(
            messages=[{"role": "user", "content": f"Tell me about number {i}."}],
            max_tokens=n,
            temperature=TEMPERATURE,
            seed=i,
        )
        for i, n in enumerate((9, 23, 40))
    ]
    out.append(
        dict(
            messages=[{"role": "user", "content": "Count with me."}],
            max_tokens=30,
            temperature=TEMPERATURE,
            seed=7,
            stop=["e"],
        )
    )
    out.append(dict(messages=[{"role": "user", "content": "Pick a word."}], max_tokens=12))
    return out


def second_turn(first: dict, reply: str) -> dict:
    """The first request's conversation, one turn on: the prompt cache can serve its whole previous prompt."""
    messages = [*first["messages"], {"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    return dict(messages=messages, max_tokens=15, temperature=TEMPERATURE, seed=3)


def reply(client, ask: dict) -> tuple[str, str, int]:
    """(text, finish reason, prompt tokens served from the prompt cache)."""
    response = client.chat.completions.create(model="tiny", **ask)
    details = response.usage.prompt_tokens_details
    return (
        response.choices[0].message.content,
        response.choices[0].finish_reason,
        (details.cached_tokens or 0) if details else 0,
    )


def distributed_server(model: str, mode: str) -> list[str]:
    """The command line of a 2-rank server's ranks (running_ranks launches it once per rank)."""
    return [sys.executable, "-m", "mlx_gemma3.server", "--model", model, "--port", "0", "--distributed", mode]


def client_for(port: int):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def serving_port(err: Path, processes, timeout: float = 120) -> int:
    """The port rank 0 says it serves on (its log line), once it does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = err.read_text() if err.exists() else ""
        if match := re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)/v1", text):
            return int(match.group(1))
        for rank, process in enumerate(processes):
            assert process.poll() is None, (
                f"rank {rank} ended:\n{err.parent.joinpath(f'rank{rank}.err').read_text()[-3000:]}"
            )
        time.sleep(0.2)
    raise AssertionError(f"rank 0 did not start serving:\n{err.read_text()[-3000:]}")


def one_process_replies(folder: Path) -> list[tuple[str, str, int]]:
    """Each request alone on a one-process server, then the first one's second turn."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_gemma3.server", "--model", str(folder), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        line = process.stderr.readline()
        assert line.startswith("serving"), line
        client = client_for(int(line.rsplit(":", 1)[1].split("/")[0]))
        alone = [reply(client, ask) for ask in asks()]
        return [*alone, reply(client, second_turn(asks()[0], alone[0][0]))]
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def alone(lively_chat_model):
    return one_process_replies(lively_chat_model)


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
def test_distributed_server_batches_like_one_process(lively_chat_model, alone, tmp_path, mode):
    """Concurrent requests to the 2-rank server decode in one batch and each gets its one-process reply (greedy,
    seeded sampling, stop strings); the next turn reuses the prompt cache on every rank; Ctrl-C on rank 0 stops
    both ranks cleanly."""
    command = distributed_server(str(lively_chat_model), mode)
    with running_ranks(tmp_path, command) as processes:
        client = client_for(serving_port(tmp_path / "rank0.err", processes))
        requests = asks()
        results: list = [None] * len(requests)
        start = threading.Barrier(len(requests))

        def send(i: int) -> None:
            start.wait()
            results[i] = reply(client, requests[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert len({r[0] for r in alone}) == len(alone) and alone[3][1] == "stop"  # different texts; a stop string hit
        assert [r[:2] for r in results] == [r[:2] for r in alone[:-1]]
        follow_up = reply(client, second_turn(requests[0], results[0][0]))
        assert follow_up[:2] == alone[-1][:2]
        assert follow_up[2] > 0  # served in part from the prompt cache, on every rank alike
        processes[0].send_signal(signal.SIGINT)
        codes = [process.wait(timeout=60) for process in processes]
    log = (tmp_path / "rank0.err").read_text()
    peaks = [int(m) for m in re.findall(r"batch of up to (\d+)", log)]
    assert max(peaks) >= 3, log  # the concurrent requests shared the batch
    assert codes == [130, 0], [(tmp_path / f"rank{r}.err").read_text()[-2000:] for r in range(2)]


def test_distributed_server_ends_when_a_rank_dies(tiny_chat_model, tmp_path):
    """Rank 1 killed while rank 0 streams a long reply: rank 0 exits non-zero with one clear line within seconds,
    and the client's stream ends without a finish reason."""
    command = distributed_server(str(tiny_chat_model[0]), "tensor")
    with running_ranks(tmp_path, command) as processes:
        client = client_for(serving_port(tmp_path / "rank0.err", processes))
        stream = client.chat.completions.create(
            model="tiny", stream=True, max_tokens=4096, messages=[{"role": "user", "content": "Talk for a long time."}]
        )
        chunks = iter(stream)
        for _ in range(5):
            next(chunks)
        code, waited = kill_rank(processes, 1, timeout=40)
        # The stream is close-delimited, so rank 0's exit ends it: the reply broke off, with no finish reason and
        # no error event (which the client would raise as openai.APIError).
        finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
        assert not any(finishes)
    err = (tmp_path / "rank0.err").read_text()
    assert code != 0 and waited < 25, err[-2000:]
    assert "another rank stopped" in err, err[-2000:]


def test_distributed_server_follower_ends_with_rank_zero(tiny_chat_model, tmp_path):
    """Rank 0 killed while the server is idle: rank 1, waiting for rank 0's next decision (no stall limit
    then), exits non-zero with one clear line at once instead of waiting forever."""
    command = distributed_server(str(tiny_chat_model[0]), "pipeline")
    with running_ranks(tmp_path, command) as processes:
        serving_port(tmp_path / "rank0.err", processes)
        code, waited = kill_rank(processes, 0, timeout=40)
    err = (tmp_path / "rank1.err").read_text()
    assert code == 1 and waited < 10, err[-2000:]
    assert "error: another rank stopped or became unreachable" in err, err[-2000:]


def chat_script(tmp_path: Path, image: Path | None) -> Path:
    """Two turns (the first with an image when given), a /save the distributed chat refuses, /quit."""
    lines = ["Hello there.", "/save " + str(tmp_path / "saved.safetensors"), "Tell me more about it.", "/quit"]
    if image is not None:
        lines.insert(0, f"/image {image}")
    script = tmp_path / "input.txt"
    script.write_text("\n".join(lines) + "\n")
    return script


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
def test_distributed_chat_replies_like_one_process(lively_chat_model, lively_image_model, tmp_path, mode):
    """Rank 0 reads the chat's input and every rank follows it: rank 0 prints the one-process replies (sampled with
    a seed, so each token depends on the logits being right on every rank; an image
    on the first turn in pipeline mode, where only rank 0 runs the vision tower), rank 1 prints nothing, and the
    cache files a distributed chat cannot write are one clear error."""
    from PIL import Image

    image = None
    folder = lively_chat_model
    if mode == "pipeline":
        folder, image = lively_image_model, tmp_path / "picture.png"
        Image.new("RGB", (40, 30), "teal").save(image)
    script = chat_script(tmp_path, image)
    command = [
        sys.executable,
        "-m",
        "mlx_gemma3.chat",
        "--model",
        str(folder),
        "--max-tokens",
        "24",
        "--temp",
        str(TEMPERATURE),
        "--seed",
        "5",
    ]
    single = subprocess.run(command, stdin=open(script), capture_output=True, text=True, timeout=300, env=ENV)
    assert single.returncode == 0, single.stderr[-2000:]
    with running_ranks(tmp_path, [*command, "--distributed", mode], stdin=script) as processes:
        outputs = [process.communicate(timeout=300)[0] for process in processes]
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert [process.returncode for process in processes] == [0, 0], [e[-2000:] for e in errors]
    assert len(set(single.stdout)) > 20 and outputs[0] == single.stdout  # two sampled replies, character for character
    assert outputs[1] == "" and errors[1] == ""
    assert "error: /save does not work in a distributed chat" in errors[0]
    if image is not None:
        assert f"[image {image} attached to your next message]" in errors[0]


def test_distributed_chat_waits_for_a_person_without_a_limit(lively_chat_model, tmp_path):
    """The stall guard (here 4 s) counts only while the ranks work: a person taking longer to type ends nothing,
    while a rank killed during the next reply ends the other with one clear line."""
    command = [
        sys.executable,
        "-m",
        "mlx_gemma3.chat",
        "--model",
        str(lively_chat_model),
        "--max-tokens",
        "-1",
        "--distributed",
        "tensor",
    ]
    with running_ranks(tmp_path, command, stdin=subprocess.PIPE, env={"MLX_GEMMA3_STALL_TIMEOUT": "4"}) as processes:
        time.sleep(8)  # nobody types yet
        assert [process.poll() for process in processes] == [None, None], (tmp_path / "rank0.err").read_text()
        processes[0].stdin.write("Hello there.\n")
        processes[0].stdin.flush()
        assert len(processes[0].stdout.read(20)) == 20  # the reply streams
        code, waited = kill_rank(processes, 0, timeout=30)
    err = (tmp_path / "rank1.err").read_text()
    assert code != 0 and waited < 10, err[-2000:]
    assert "another rank stopped" in err, err[-2000:]
