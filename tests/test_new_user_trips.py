"""The trips a new user hit: one rule for a system prompt on a base model, bad paths as one line, generate_step's
prompt types, one temperature range, one parameter count, one prompt length, usage naming the command as run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading

import mlx.core as mx
import numpy as np
import openai
import pytest
from conftest import convert, greedy_fixture, run_cli

import mlx_gemma3
from mlx_gemma3.__main__ import COMMANDS
from mlx_gemma3.serve.http import ServerState, make_server

SYSTEM = "Answer in one word."
MISSING = "no-such-folder"


@pytest.fixture(scope="module")
def chat_folder(tiny_chat_model):
    return str(tiny_chat_model[0])


@pytest.fixture(scope="module")
def base_folder(tiny_chat_model, tmp_path_factory):
    """The tiny chat model without its chat template: a base model by the folder rule, with the same weights."""
    folder = tmp_path_factory.mktemp("base") / "tiny-pt"
    shutil.copytree(tiny_chat_model[0], folder)
    (folder / "chat_template.jinja").unlink()
    return str(folder)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def quiet_generate(folder: str, *args: str) -> subprocess.CompletedProcess:
    return run_cli("mlx_gemma3.generate", "--model", folder, "--max-tokens", "4", "--verbose", "false", *args)


# --- a system prompt on a model without a chat template: Gemma 3's own chat format, everywhere -----------------


def test_a_base_models_system_prompt_goes_into_gemmas_chat_format(base_folder, chat_folder):
    """Reference: Gemma 3's own chat template (the fixture, Google's template) renders the same conversation."""
    _, base = mlx_gemma3.load(base_folder)
    _, chat = mlx_gemma3.load(chat_folder)
    assert base.chat_template is None and chat.chat_template is not None
    from mlx_gemma3.processing.prompt import prompt_ids

    assert prompt_ids(base, "Hi", system=SYSTEM) == prompt_ids(chat, "Hi", system=SYSTEM)
    assert prompt_ids(base, "Hi") == [2, *base.tokenizer.encode("Hi", add_bos=False)]  # no system: plain text
    with pytest.raises(mlx_gemma3.Gemma3Error, match="use_chat_template=False"):
        prompt_ids(base, "Hi", system=SYSTEM, use_chat_template=False)


@pytest.mark.slow
def test_generate_takes_a_system_prompt_on_a_base_model_as_chat_and_server_do(base_folder, chat_folder):
    on_base = quiet_generate(base_folder, "--prompt", "Hi", "--system", SYSTEM)
    on_chat = quiet_generate(chat_folder, "--prompt", "Hi", "--system", SYSTEM)
    assert on_base.returncode == 0, on_base.stderr
    assert on_base.stdout == on_chat.stdout  # same weights, same prompt: the chat format with the system folded in
    notes = [line for line in on_base.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "base" in notes[0] and "note:" not in on_chat.stderr


@pytest.mark.slow
def test_chat_says_on_stdout_that_the_model_is_a_base_model(base_folder, chat_folder):
    on_base = run_cli("mlx_gemma3.chat", "--model", base_folder, "--max-tokens", "3", stdin="Hi\n")
    on_chat = run_cli("mlx_gemma3.chat", "--model", chat_folder, "--max-tokens", "3", stdin="Hi\n")
    assert on_base.returncode == on_chat.returncode == 0, on_base.stderr
    first, *reply = on_base.stdout.splitlines()
    assert first.startswith("note:") and "tiny-pt" in first and "base" in first
    assert "\n".join(reply) + "\n" == on_chat.stdout  # then the same reply as the chat model's
    assert "note:" not in on_chat.stdout + on_chat.stderr


def serve(folder: str):
    model, processor = mlx_gemma3.load(folder)
    state = ServerState(model, processor, os.path.basename(folder))
    httpd = make_server(state, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_the_server_tells_clients_whether_the_model_is_a_base_model(base_folder, chat_folder):
    replies, flags = [], []
    for folder in (base_folder, chat_folder):
        httpd = serve(folder)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key="x", max_retries=0)
        try:
            flags.append(client.models.list().data[0].base_model)
            reply = client.chat.completions.create(
                model="tiny",
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
                max_tokens=4,
                temperature=0,
            )
            replies.append(reply.choices[0].message.content)
        finally:
            httpd.shutdown()
            httpd.server_close()
    assert flags == [True, False]
    assert replies[0] == replies[1]  # the system prompt went in the same way as with the chat template


# --- bad paths: one line, nothing lost ---------------------------------------------------------------------------


@pytest.mark.slow
def test_chat_save_into_a_missing_folder_is_one_line_and_the_chat_goes_on(chat_folder, tmp_path):
    target = tmp_path / MISSING / "talk.safetensors"
    stdin = f"Hi\n/save {target}\nAgain\n/save {tmp_path / 'talk.safetensors'}\n"
    result = run_cli("mlx_gemma3.chat", "--model", chat_folder, "--max-tokens", "3", stdin=stdin)
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and MISSING in errors[0] and "Traceback" not in result.stderr
    model, processor = mlx_gemma3.load(chat_folder)
    chat = mlx_gemma3.Chat(model, processor)
    chat.load(tmp_path / "talk.safetensors")  # the conversation went on and was saved whole
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["Hi", "Again"]


def test_saving_into_a_missing_folder_is_a_clear_error(chat_folder, tmp_path):
    model, processor = mlx_gemma3.load(chat_folder)
    chat = mlx_gemma3.Chat(model, processor, max_tokens=2)
    chat.send("Hi")
    with pytest.raises(mlx_gemma3.Gemma3Error, match="does not exist"):
        chat.save(tmp_path / MISSING / "talk.safetensors")
    steps = mlx_gemma3.stream_generate(
        model, processor, "Hi", max_tokens=2, prompt_cache_file=tmp_path / MISSING / "p.safetensors"
    )
    with pytest.raises(mlx_gemma3.Gemma3Error, match="does not exist"):
        next(steps)
    assert not (tmp_path / MISSING).exists()


def test_generate_prompt_cache_file_into_a_missing_folder_is_one_line(chat_folder, tmp_path):
    result = quiet_generate(chat_folder, "--prompt", "Hi", "--prompt-cache-file", str(tmp_path / MISSING / "p"))
    line = one_error_line(result)
    assert "--prompt-cache-file" in line and MISSING in line and result.stdout == ""


def test_a_missing_image_is_reported_as_missing_before_the_model_loads(chat_folder, tmp_path):
    result = quiet_generate(chat_folder, "--prompt", "Hi", "--image", str(tmp_path / "cat.png"))
    line = one_error_line(result)
    assert "cat.png" in line and "does not exist" in line and "text only" not in line
    # before the model loads: a missing model folder is not even looked at yet
    result = quiet_generate(str(tmp_path / MISSING), "--prompt", "Hi", "--image", str(tmp_path / "cat.png"))
    assert "cat.png" in one_error_line(result)


# --- generate_step takes mlx-lm's habit: an mx.array prompt --------------------------------------------------------


@pytest.fixture(scope="module")
def greedy(tmp_path_factory):
    return greedy_fixture(tmp_path_factory.mktemp("arrays"), 3, 20, 6, 8)


@pytest.mark.slow
def test_generate_step_takes_arrays_lists_and_numpy(greedy):
    model, _, prompt, expected, _ = greedy  # expected: transformers' greedy continuation
    forms = [prompt, tuple(prompt), mx.array(prompt), mx.array([prompt]), np.array(prompt), np.array([prompt])]
    for form in forms:
        steps = mlx_gemma3.generate_step(model, form, model.make_cache())
        assert [next(steps)[0] for _ in range(6)] == expected, type(form)
        steps.close()
    for bad in (mx.array([prompt, prompt]), mx.array(prompt, dtype=mx.float32), "hello", [1.5, 2.0]):
        with pytest.raises(mlx_gemma3.Gemma3Error, match="token ids"):
            next(mlx_gemma3.generate_step(model, bad, model.make_cache()))


# --- one temperature range: OpenAI's [0, 2] ------------------------------------------------------------------------


def test_temperature_has_one_range_everywhere(chat_folder):
    result = quiet_generate(chat_folder, "--prompt", "Hi", "--temp", "5")
    assert result.returncode == 2 and "--temp" in result.stderr and "[0, 2]" in result.stderr
    model, processor = mlx_gemma3.load(chat_folder)
    with pytest.raises(mlx_gemma3.Gemma3Error, match=r"\[0, 2\]"):
        mlx_gemma3.generate(model, processor, "Hi", temp=5.0, max_tokens=1)
    assert isinstance(mlx_gemma3.generate(model, processor, "Hi", temp=2.0, max_tokens=1, seed=0), str)
    httpd = serve(chat_folder)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError, match=r"'temperature' must lie in \[0(\.0)?, 2(\.0)?\]"):
            client.completions.create(model="tiny", prompt="Hi", max_tokens=1, temperature=5)
        assert client.completions.create(model="tiny", prompt="Hi", max_tokens=1, temperature=2, seed=0).choices
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- one parameter count: the checkpoint's, quantized or not -------------------------------------------------------


@pytest.mark.slow
def test_the_lora_cli_and_the_converter_count_the_parameters_transformers_counts(tiny_chat_model, tmp_path, capsys):
    from test_lora_cli import write_data

    from mlx_gemma3 import lora

    _, hf_folder, reference = tiny_chat_model
    expected = reference.num_parameters()  # transformers' count (the tied embedding once)
    folder = convert(hf_folder, tmp_path / "q4", "-q")
    converted = capsys.readouterr().err
    assert f"{expected:,} parameters" in converted
    args = [
        "--model",
        str(folder),
        "--train",
        "--data",
        str(write_data(tmp_path / "data")),
        "--iters",
        "1",
        "--num-layers",
        "-1",
    ]
    code = lora.main([*args, "--batch-size", "1", "--adapter-path", str(tmp_path / "adapters")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(rf"Trainable parameters: .*M/{expected / 1e6:.3f}M\)", out), out


# --- one prompt length: progress and statistics count the same tokens --------------------------------------------


def test_prefill_progress_counts_the_prompt_the_statistics_count(chat_folder):
    model, processor = mlx_gemma3.load(chat_folder)
    reports = []
    prompt = "The lighthouse keeper climbed the stairs " * 12
    last = list(
        mlx_gemma3.stream_generate(
            model,
            processor,
            prompt,
            max_tokens=2,
            use_chat_template=False,
            prefill_step_size=16,
            prefill_progress=lambda done, total: reports.append((done, total)),
        )
    )[-1]
    n = len(processor.tokenizer.encode(prompt, add_bos=True))  # reference: the tokenizer's count of the prompt
    assert last.prompt_tokens == n
    assert reports[-1] == (n, n) and {total for _, total in reports} == {n}
    assert [done for done, _ in reports] == sorted({*range(16, n - 1, 16), n})


@pytest.mark.slow
def test_the_progress_line_ends_at_the_prompt_length_the_stats_print(chat_folder):
    from test_first_contact import prompt_of, read_pty

    prompt = prompt_of(chat_folder, 300)
    shown = read_pty(
        [sys.executable, "-m", "mlx_gemma3.generate", "--model", chat_folder, "--prompt", prompt]
        + ["--no-chat-template", "--max-tokens", "2", "--prefill-step-size", "128"]
    )
    n = int(re.search(r"Prompt: (\d+) tokens", shown)[1])
    assert f"\rprefill 128/{n} prompt tokens" in shown and f"\rprefill {n}/{n} prompt tokens (100%)" in shown, shown


# --- usage names the command as it was run ------------------------------------------------------------------------


def usage_line(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0]


@pytest.mark.slow
def test_usage_names_the_command_as_it_was_run():
    script = shutil.which("mlx-gemma3", path=os.path.dirname(sys.executable))
    assert script, "the mlx-gemma3 console script is installed with the package"
    for name in COMMANDS:
        assert usage_line([script, name, "--help"]).startswith(f"usage: mlx-gemma3 {name} "), name
    assert usage_line([sys.executable, "-m", "mlx_gemma3", "shield", "--help"]).startswith(
        "usage: python -m mlx_gemma3 shield "
    )
    assert usage_line([sys.executable, "-m", "mlx_gemma3.shield", "--help"]).startswith(
        "usage: python -m mlx_gemma3.shield "
    )
    bad = subprocess.run([script, "shield", "--frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "(see mlx-gemma3 shield --help)" in bad.stderr
