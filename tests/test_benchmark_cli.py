"""`python -m mlx_gemma3.benchmark` end to end on a tiny model: it runs, prints the figures, writes its JSON,
and reports bad input in one `error:` line with a non-zero exit."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

FIGURES = ("Prefill:", "Decode:", "Time to first token:", "Peak memory:", "KV cache:")


@pytest.fixture(scope="module")
def tiny_folder(converted_tiny):
    """A converted tiny text model without a tokenizer: the benchmark feeds token ids."""
    return converted_tiny(seed=3).folder


def test_benchmark_prints_the_figures_and_writes_json(tiny_folder, tmp_path):
    out = tmp_path / "bench.json"
    args = ("--model", str(tiny_folder), "--prompt-tokens", "40", "--generation-tokens", "6", "--runs", "2")
    result = run_cli("mlx_gemma3.benchmark", *args, "--json", str(out))
    assert result.returncode == 0, result.stderr
    for label in FIGURES:
        assert label in result.stdout, result.stdout
    assert "Prefill: 40 tokens" in result.stdout and "Decode: 6 tokens" in result.stdout
    assert result.stderr.count("run ") == 2  # one progress line per run
    report = json.loads(out.read_text())
    assert len(report["runs"]) == 2 and report["prompt_tokens"] == 40
    for run in report["runs"]:
        assert run["generated"] == 6  # EOS is suppressed: every run decodes exactly --generation-tokens
        assert run["prefill_tps"] > 0 and run["decode_tps"] > 0 and run["ttft_s"] > 0 and run["peak_memory_gb"] > 0
        assert run["kv_cache_bytes"] > 0
    rates = [run["decode_tps"] for run in report["runs"]]
    assert min(rates) <= report["median"]["decode_tps"] <= max(rates)


def test_benchmark_one_prompt_token_one_generated_token(tiny_folder):
    args = ("--model", str(tiny_folder), "--prompt-tokens", "1", "--generation-tokens", "1", "--runs", "1")
    result = run_cli("mlx_gemma3.benchmark", *args, "--no-warmup")
    assert result.returncode == 0, result.stderr
    assert "Decode: 1 tokens, n/a" in result.stdout


BAD_INPUT = [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--runs", "0"], "at least 1"),
    (["--prompt-tokens", "0"], "at least 1"),
    (["--generation-tokens", "-3"], "at least 1"),
    (["--prompt-tokens", "1020", "--generation-tokens", "10"], "context is 1024"),
    (["--runs", "many"], "--runs"),
    (["--kv-bits", "3"], "--kv-bits"),
    (["--dtype", "int8"], "--dtype"),
    (["--kv-bits", "8", "--kv-group-size", "32"], "head_dim 16 is not divisible"),
    (["--json", "/nonexistent/dir/out.json"], "does not exist"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_benchmark_bad_input_is_one_line(tiny_folder, args, message):
    full = args if args[0] == "--model" else ["--model", str(tiny_folder), *args]
    result = run_cli("mlx_gemma3.benchmark", *full)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
