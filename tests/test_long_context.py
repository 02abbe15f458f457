"""Long context: RoPE exact at 128K positions, an 8K prompt in chunks equal to transformers' single pass, prefill
memory that grows as the memory model says, and the memory habits a Mac needs (wired limit, buffer cache)."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import convert, random_ids, reference_logits, tiny_text_model
from transformers import Gemma3Config
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding, apply_rotary_pos_emb

import mlx_gemma3
from mlx_gemma3.generation.step import prefill
from mlx_gemma3.model.config import FULL, SLIDING, parse_config
from mlx_gemma3.model.device import (
    CLOSE_TO_WORKING_SET,
    bound_buffer_cache,
    buffer_cache_limit,
    memory_warning,
    wire_memory,
    wired_limit,
)
from mlx_gemma3.model.memory import attention_bytes, kv_bytes, kv_value_bytes, weight_bytes
from mlx_gemma3.model.rope import RoPE, rotate
from mlx_gemma3.model.text import Gemma3TextLM

POSITIONS = [0, 1, 1023, 1024, 32767, 65536, 131071]
# Gemma 3 4B's config.json as the Hub ships it (text_config keys that differ from the class defaults).
GEMMA3_4B = {
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 34,
        "sliding_window": 1024,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    },
    "vision_config": {},
}
LINEAR_X8 = {
    FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
}


def transformers_rotary(layer_type: str, dtype: torch.dtype):
    """transformers' cos and sin [positions, head_dim] for the 4B config, in `dtype` as a model in it computes them."""
    config = Gemma3Config(**{k: v for k, v in GEMMA3_4B.items() if k != "model_type"}).text_config
    with torch.no_grad():
        cos, sin = Gemma3RotaryEmbedding(config)(torch.zeros(1, dtype=dtype), torch.tensor([POSITIONS]), layer_type)
    return cos[0], sin[0]


@pytest.mark.parametrize("layer_type", [FULL, SLIDING])
def test_rope_at_128k_positions_equals_transformers_in_float32(layer_type):
    text = parse_config(GEMMA3_4B).text
    rope = RoPE(text.head_dim, text.rope_full if layer_type == FULL else text.rope_sliding)
    cos, sin = transformers_rotary(layer_type, torch.float32)
    half = text.head_dim // 2
    for i, position in enumerate(POSITIONS):
        ours = rope.rotation(position, 1, mx.float32)
        assert np.abs(np.array(ours.cos[0]) - cos[i].numpy()).max() <= 1e-5, position
        assert np.abs(np.array(ours.sin[0, half:]) - sin[i, half:].numpy()).max() <= 1e-5, position


@pytest.mark.parametrize("layer_type", [FULL, SLIDING])
def test_rope_at_128k_positions_in_bfloat16_as_transformers_computes_it(layer_type):
    """cos and sin rounded to bfloat16, then q·cos + rotate_half(q)·sin with every product and sum in bfloat16:
    transformers' bfloat16 model does exactly this, and so do we, to the bit."""
    text = parse_config(GEMMA3_4B).text
    rope = RoPE(text.head_dim, text.rope_full if layer_type == FULL else text.rope_sliding)
    cos, sin = transformers_rotary(layer_type, torch.bfloat16)
    q = torch.randn(1, 8, len(POSITIONS), text.head_dim, generator=torch.Generator().manual_seed(0))
    q = q.to(torch.bfloat16)
    expected, _ = apply_rotary_pos_emb(q, q, cos[None], sin[None])
    tables = [rope.rotation(position, 1, mx.bfloat16) for position in POSITIONS]
    ours_q = mx.array(q.float().numpy()).astype(mx.bfloat16)
    rotated = mx.concatenate([rotate(ours_q[:, :, i : i + 1], t) for i, t in enumerate(tables)], axis=2)
    assert np.array_equal(np.array(rotated.astype(mx.float32)), expected.float().numpy())


@pytest.mark.slow
def test_an_8k_prompt_in_chunks_equals_the_single_pass(tmp_path):
    """8,192 tokens in chunks of 512 (×8 RoPE on the full layers, a 16-token window wrapped 500 times) against
    transformers' forward over the whole prompt at once."""
    length = 8192
    reference = tiny_text_model(
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=length, rope_parameters=LINEAR_X8
    )
    reference.save_pretrained(tmp_path / "hf")
    model, _ = mlx_gemma3.load(convert(tmp_path / "hf", tmp_path / "mlx"))
    ids = random_ids(length)
    cache = model.make_cache()
    ours = np.concatenate(
        [np.array(model(mx.array(ids[:, s : s + 512]), cache=cache)) for s in range(0, length, 512)], axis=1
    )
    assert np.abs(ours - reference_logits(reference, ids)).max() <= 1e-4


MEMORY_CONFIG = dict(
    model_type="gemma3_text",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=16,
    sliding_window=16,
    layer_types=[FULL, SLIDING],  # the full layer first: its attention feeds the next layer's keys, so it runs
    dtype="float32",
)


def prefill_peak(model, tokens: int, chunk: int) -> int:
    cache = model.make_cache()
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    prefill(model, random_ids(tokens)[0].tolist(), cache, chunk)
    return mx.get_peak_memory()


@pytest.mark.slow
def test_prefill_peak_memory_grows_as_the_memory_model_says():
    """From 4K to 16K tokens the peak of a chunked prefill grows by the KV formula's growth plus the composed
    attention's last chunk (mask and two score matrices, model/memory.py), within 10 %: nothing else grows."""
    config = parse_config(MEMORY_CONFIG)
    model = Gemma3TextLM(config)
    mx.eval(model.parameters())
    chunk = 512
    peaks = {tokens: prefill_peak(model, tokens, chunk) for tokens in (4096, 16384)}

    def predicted(tokens):
        kv = kv_bytes(config.text, tokens, mx.float32.size)
        return kv + attention_bytes(config.text, chunk, tokens, mx.float32, composed=True)

    growth, expected = peaks[16384] - peaks[4096], predicted(16384) - predicted(4096)
    assert abs(growth - expected) <= 0.1 * expected, (growth, expected)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("habits")
    tiny_text_model().save_pretrained(folder / "hf")
    return mlx_gemma3.load(convert(folder / "hf", folder / "mlx"))[0]


def test_the_wired_limit_warns_when_the_model_nears_the_working_set_as_mlx_lm_does(tiny, capsys):
    """mlx-lm 0.32.2 warns when the model needs more than 90 % of the recommended working set (share: model bytes
    ÷ working set)."""
    weights = weight_bytes(tiny)
    for share, warned in ((CLOSE_TO_WORKING_SET + 0.01, True), (CLOSE_TO_WORKING_SET - 0.01, False)):
        with wired_limit(tiny, tokens=1, working_set=int(weights / share)):
            pass
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == int(warned), lines
    assert "close to the GPU's recommended working set" in memory_warning(
        tiny.config.text, weights, 1, 4, int(weights / 0.91)
    )


def test_the_kv_warning_names_a_max_kv_size_whose_caches_fit(tiny):
    """The model fits but its KV at 32K tokens does not: the warning names a --max-kv-size, and real caches bounded
    by it, filled with 32K tokens, hold less than the room left; unbounded ones hold more."""
    tokens, text = 32768, tiny.config.text
    weights = weight_bytes(tiny)
    room = kv_bytes(text, tokens, 4) // 2
    warning = memory_warning(text, weights, tokens, kv_value_bytes(mx.float32), weights + room)
    size = int(re.search(r"--max-kv-size (\d+)", warning).group(1))
    assert filled_cache_bytes(tiny, tokens, max_kv_size=size) <= room < filled_cache_bytes(tiny, tokens)


def filled_cache_bytes(model, tokens: int, max_kv_size: int | None = None) -> int:
    """Bytes a model's caches hold after `tokens` tokens (random keys and values, 4096 at a time)."""
    cfg = model.config.text
    cache = model.make_cache(max_kv_size=max_kv_size)
    for start in range(0, tokens, 4096):
        n = min(4096, tokens - start)
        for layer in cache:
            keys = mx.random.normal((1, cfg.num_key_value_heads, n, cfg.head_dim))
            layer.update_and_fetch(keys, keys)
            mx.eval(layer.state)
    return sum(layer.nbytes for layer in cache)


def test_no_warning_when_model_and_kv_fit(tiny):
    text, weights = tiny.config.text, weight_bytes(tiny)
    working_set = 2 * (weights + kv_bytes(text, 1024, 4))
    assert memory_warning(text, weights, 1024, 4, working_set) is None


def test_the_server_bounds_the_buffer_cache_to_a_quarter_of_the_room_left(tiny):
    """Under MLX's default on Metal (1.5 × the working set) the bound is a quarter of what the weights leave; it
    never raises a lower bound (MLX's CPU default, 32 MB)."""
    memory, before = 64 * 2**30, mx.set_cache_limit(0)
    quarter = (memory - weight_bytes(tiny)) // 4
    try:
        mx.set_cache_limit(memory * 3 // 2)
        assert bound_buffer_cache(tiny, memory) == buffer_cache_limit(weight_bytes(tiny), memory) == quarter
        assert mx.set_cache_limit(32 * 2**20) == quarter  # what MLX held
        assert bound_buffer_cache(tiny, memory) == 32 * 2**20
        assert mx.set_cache_limit(before) == 32 * 2**20
    finally:
        mx.set_cache_limit(before)


def test_the_memory_habits_change_nothing_on_the_cpu(tiny):
    """No recommended working set here: nothing is wired (the command lines call this on every device)."""
    assert wire_memory(tiny, 1024) is None
