"""Both CLIs end to end on a tiny model (subprocess), and their one-line errors for bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

import mlx_gemma3
from mlx_gemma3.processing.prompt import prompt_ids


def reference_reply(reference, processor, prompt, max_tokens: int, **prompt_options) -> str:
    """transformers' greedy continuation of the prompt, cut at the first end-of-turn/EOS, as text."""
    ids = prompt_ids(processor, prompt, **prompt_options)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=[1, 106], pad_token_id=0
        )
    new = [t for t in out[0, len(ids) :].tolist() if t not in (1, 106)]
    return processor.tokenizer.decode(new)


def test_generate_cli_prints_the_reference_continuation_and_stats(tiny_chat_model):
    folder, _, reference = tiny_chat_model
    _, processor = mlx_gemma3.load(folder)
    result = run_cli("mlx_gemma3.generate", "--model", str(folder), "--prompt", "Hello world", "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference_reply(reference, processor, "Hello world", 12) + "\n"
    assert "Prompt:" in result.stderr and "tokens-per-sec" in result.stderr and "Peak memory" in result.stderr


def test_generate_cli_plain_completion_from_stdin(tiny_chat_model):
    folder, _, reference = tiny_chat_model
    _, processor = mlx_gemma3.load(folder)
    args = ("--model", str(folder), "--prompt", "-", "--no-chat-template", "--max-tokens", "10", "--verbose", "false")
    result = run_cli("mlx_gemma3.generate", *args, stdin="Once upon a time")
    assert result.returncode == 0, result.stderr
    expected = reference_reply(reference, processor, "Once upon a time", 10, use_chat_template=False)
    assert result.stdout == expected + "\n" and result.stderr == ""


def test_chat_cli_keeps_the_conversation(tiny_chat_model, tmp_path):
    folder, _, reference = tiny_chat_model
    model, processor = mlx_gemma3.load(folder)
    saved = tmp_path / "talk.safetensors"
    stdin = f"Hi\nHow are you?\n/save {saved}\n/reset\nHi\n/quit\n"
    result = run_cli("mlx_gemma3.chat", "--model", str(folder), "--max-tokens", "6", stdin=stdin)
    assert result.returncode == 0, result.stderr
    chat = mlx_gemma3.Chat(model, processor, max_tokens=6)
    chat.load(saved)
    first, second = chat.messages[1]["content"], chat.messages[3]["content"]
    assert first == reference_reply(reference, processor, "Hi", 6)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first}]
    assert second == reference_reply(reference, processor, [*history, {"role": "user", "content": "How are you?"}], 6)
    assert result.stdout == f"{first}\n{second}\n{first}\n"  # no `>> ` prompts for piped input; reset answers afresh
    assert "[conversation reset]" in result.stderr


BAD_INPUT = [
    (["--model", "/nonexistent/model", "--prompt", "hi"], "does not exist"),
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "word " * 1100, "--no-chat-template"], "context is 1024"),
    (["--prompt", "hi", "--temp", "-1"], "temp"),
    (["--prompt", "hi", "--max-tokens", "many"], "--max-tokens"),
    (["--prompt", "hi", "--kv-bits", "3"], "--kv-bits"),
    (["--prompt", "hi", "--top-p", "1.5"], "top_p"),
    (["--prompt", "hi", "--max-kv-size", "0"], "max_kv_size"),
    (["--prompt", "hi", "--system", "x", "--no-chat-template"], "system prompt needs the chat format"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_generate_cli_bad_input_is_one_line(tiny_chat_model, args, message):
    folder, _, _ = tiny_chat_model
    full = args if args[0] == "--model" else ["--model", str(folder), *args]
    result = run_cli("mlx_gemma3.generate", *full)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_chat_cli_missing_model_is_one_line():
    result = run_cli("mlx_gemma3.chat", "--model", "/nonexistent/model", stdin="hi\n")
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


@pytest.mark.slow
def test_chat_cli_ctrl_c_stops_a_reply_and_keeps_the_chat(tiny_chat_model):
    import os
    import signal
    import subprocess
    import sys

    folder, _, _ = tiny_chat_model
    chat = subprocess.Popen(
        [sys.executable, "-m", "mlx_gemma3.chat", "--model", str(folder), "--max-tokens", "1000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    chat.stdin.write("Tell me a long story\n")
    chat.stdin.flush()
    chat.stdout.read(1)  # the reply has started (1000 tokens take seconds here)
    chat.send_signal(signal.SIGINT)
    out, err = chat.communicate("/reset\n/quit\n", timeout=120)
    assert chat.returncode == 0, err
    assert "[stopped]" in err and "[conversation reset]" in err and "Traceback" not in err
