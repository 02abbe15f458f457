"""Fuzzing every reader of outside data (tests/fuzz.py), seeded and bounded; the three GGUF tracebacks of issue 22
through the real converter CLI; --verify. The counts per reader are printed at the end of the run."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FUZZ_TALLIES, run_cli
from fuzz import BROKEN_TOKENS, long_token, real_head, tiny_gguf

pytestmark = pytest.mark.slow  # each reader runs in a child process: seconds each
FUZZ = Path(__file__).parent / "fuzz.py"
SEED = 22
# Random cases per reader in CI (beyond each reader's fixed cases); benchmarks/fuzz.py runs as many as asked.
CI_CASES = {
    "gguf-tiny": 60,
    "gguf-270m": 12,
    "safetensors": 60,
    "config": 60,
    "tokenizer": 40,
    "image": 60,
    "server": 30,
}


@pytest.fixture
def fuzz_tallies(request) -> list[dict]:
    return request.config.stash.setdefault(FUZZ_TALLIES, [])


def run_fuzz(reader: str, cases: int, work: Path) -> dict:
    command = [sys.executable, str(FUZZ), reader, "--seed", str(SEED), "--cases", str(cases), "--work", str(work)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"the {reader} fuzzer died during: {result.stderr[-2000:]}"
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("reader", sorted(CI_CASES))
def test_every_case_ends_in_one_clear_error_or_a_valid_result(reader, tmp_path, fuzz_tallies):
    tally = run_fuzz(reader, CI_CASES[reader], tmp_path / reader)
    fuzz_tallies.append(tally)
    assert tally["failures"] == []
    assert tally["cases"] == tally["clean_errors"] + tally["accepted"] > CI_CASES[reader]
    assert tally["clean_errors"] > 0 and tally["accepted"] > 0  # the undamaged input (or luckier damage) is accepted


@pytest.fixture(scope="module")
def real_header():
    return real_head()


@pytest.mark.parametrize("index", BROKEN_TOKENS)
def test_non_utf8_vocabulary_string_in_the_real_270m_is_one_line(real_header, index, tmp_path):
    """Issue 22's three tracebacks (`UnicodeDecodeError: ... byte 0x9a in position 3`), now one-line errors."""
    head, end, size = real_header
    index, at = long_token(head, index)
    path = tmp_path / "broken.gguf"
    with open(path, "wb") as f:
        f.write(head[: at + 3] + b"\x9a" + head[at + 4 :])
        f.truncate(size)
    out = tmp_path / "out"
    result = run_cli("mlx_gemma3.convert", "--gguf", str(path), "--mlx-path", str(out))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0] == (
        f"error: {path}: tokenizer.ggml.tokens[{index}] (string at byte {at - 8}) is not UTF-8: byte 0x9a at 3 — "
        "the file is damaged, truncated or not GGUF: download it again (check it with --verify SHA256)"
    )
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["broken.gguf"]


def test_verify_refuses_a_file_whose_sha256_differs(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf", tmp_path)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "out"
    wrong = run_cli("mlx_gemma3.convert", "--gguf", str(path), "--mlx-path", str(out), "--verify", "0" * 64)
    assert wrong.returncode == 1 and wrong.stderr == (
        f"error: {path} has SHA-256 {actual}, not the {'0' * 64} given to --verify: "
        "the file is damaged or a different one — download it again\n"
    )
    assert not out.exists()
    malformed = run_cli("mlx_gemma3.convert", "--gguf", str(path), "--mlx-path", str(out), "--verify", "abc")
    assert malformed.returncode == 1 and "64 hexadecimal digits" in malformed.stderr and not out.exists()
    right = run_cli("mlx_gemma3.convert", "--gguf", str(path), "--mlx-path", str(out), "--verify", actual.upper())
    assert right.returncode == 0, right.stderr
    assert (out / "config.json").is_file()
