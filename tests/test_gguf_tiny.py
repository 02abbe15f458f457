"""GGUF import on tiny models written with the `gguf` package as llama.cpp writes them: text + mmproj, bad files."""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import sentencepiece
import torch
from conftest import TINY_TEXT, TINY_VISION, random_ids, run_cli, tiny_multimodal_model
from sentencepiece import sentencepiece_model_pb2
from spm_fixture import train_tokenizer

import mlx_gemma3

SPM_IMAGE_TOKENS = dict(boi_token_index=107, eoi_token_index=108, image_token_index=109)
QUANTIZED = {
    "attn_q": gguf.GGMLQuantizationType.Q4_0,
    "ffn_up": gguf.GGMLQuantizationType.Q8_0,
    "token_embd": gguf.GGMLQuantizationType.Q8_0,
    "ffn_down": gguf.GGMLQuantizationType.Q5_0,
}


# Text the tokenizer rebuilt from the GGUF must split as the SentencePiece model the GGUF was written from:
# merges (scores), a control-free special piece, digits, byte fallback, runs of spaces.
TOKENIZER_TEXTS = [
    "hello <start_of_turn>",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 12345 and 3.14159",
    "안녕하세요 세계. Emoji: 😀",
    "lots   of    spaces\n\n\tand tabs",
]


def hf_name_map(n_blocks: int, arch) -> dict[str, str]:
    return gguf.TensorNameMap(arch, n_blocks)


def add_tokenizer(writer, folder: Path) -> None:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(train_tokenizer(folder).read_bytes())
    types = [3 if p.type == p.UNKNOWN else int(p.type) for p in proto.pieces]  # llama.cpp types <unk> control
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece.replace("\u2581", " ") if t == 4 else p.piece for p, t in zip(proto.pieces, types)])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types(types)
    for key, i in (("unknown", 3), ("bos", 2), ("eos", 1), ("padding", 0)):
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", i)


def gguf_tensor(writer, name: str, value: np.ndarray, kind=gguf.GGMLQuantizationType.F32) -> np.ndarray:
    """Write one tensor; returns the values GGML will read back (dequantized)."""
    if kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, value.astype(np.float32))
        return value.astype(np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, value.astype(np.float16))
        return value.astype(np.float16).astype(np.float32)
    packed = gguf.quants.quantize(value.astype(np.float32), kind)
    writer.add_tensor(name, packed, raw_dtype=kind)
    return gguf.quants.dequantize(packed, kind).reshape(value.shape)


def write_text_gguf(path: Path, model, folder: Path) -> dict[str, np.ndarray]:
    """The text tower as llama.cpp's converter writes it (norms as 1 + w); returns the weights GGML reads."""
    config = model.config.get_text_config()
    writer = gguf.GGUFWriter(path, "gemma3")
    for key, value in {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads,
        "attention.key_length": config.head_dim,
        "attention.value_length": config.head_dim,
        "attention.sliding_window": config.sliding_window,
    }.items():
        writer.add_uint32(f"gemma3.{key}", value)
    writer.add_float32("gemma3.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32("gemma3.rope.freq_base", 1_000_000.0)
    add_tokenizer(writer, folder)
    names = hf_name_map(config.num_hidden_layers, gguf.MODEL_ARCH.GEMMA3)
    read_back = {}
    for key, tensor in model.state_dict().items():
        if "language_model" not in key or key.endswith("lm_head.weight"):
            continue
        hf_key = key.replace("model.language_model.", "model.")
        name = names.get_name(hf_key.removesuffix(".weight"))
        value = tensor.float().numpy() + (1.0 if hf_key.endswith("norm.weight") else 0.0)
        kind = next(
            (k for part, k in QUANTIZED.items() if f"{part}" == name.split(".")[-1]), gguf.GGMLQuantizationType.F32
        )
        stored = gguf_tensor(writer, name + ".weight", value, kind)
        read_back[key] = stored - (1.0 if hf_key.endswith("norm.weight") else 0.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read_back


def write_mmproj(path: Path, model) -> dict[str, np.ndarray]:
    """The vision tower and projector as llama.cpp's mmproj: soft-embedding norm as 1 + w, projector in F16."""
    vision = model.config.vision_config
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "gemma3")
    for key, value in {
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "embedding_length": vision.hidden_size,
        "feed_forward_length": vision.intermediate_size,
        "block_count": vision.num_hidden_layers,
        "attention.head_count": vision.num_attention_heads,
        "projector.scale_factor": vision.image_size // vision.patch_size // 2,
    }.items():
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", vision.layer_norm_eps)
    names = hf_name_map(vision.num_hidden_layers, gguf.MODEL_ARCH.MMPROJ)
    read_back = {}
    for key, tensor in model.state_dict().items():
        if "vision_tower" not in key and "multi_modal_projector" not in key:
            continue
        if ".head." in key:
            continue  # the SigLIP pooling head Gemma 3 does not use
        hub_key = key.replace("model.", "", 1).replace("vision_tower.", "vision_tower.vision_model.", 1)
        hub_key = hub_key.replace("mm_input_projection_weight", "mm_input_projection.weight")
        stem, _, suffix = hub_key.rpartition(".")
        name = f"{names.get_name(stem)}.{suffix}"
        shift = 1.0 if "soft_emb_norm" in key else 0.0
        kind = gguf.GGMLQuantizationType.F16 if "input_projection" in name else gguf.GGMLQuantizationType.F32
        read_back[key] = gguf_tensor(writer, name, tensor.float().numpy() + shift, kind) - shift
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read_back


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory, converted_tiny):
    folder = tmp_path_factory.mktemp("gguf")
    model = converted_tiny(seed=9, vision=True, image_tokens=SPM_IMAGE_TOKENS).reference
    stored = write_text_gguf(folder / "text.gguf", model, folder)
    stored.update(write_mmproj(folder / "mmproj.gguf", model))
    reference = copy.deepcopy(model)
    reference.load_state_dict({k: torch.tensor(v) for k, v in stored.items()}, strict=False)
    return folder, reference.eval()


def test_text_gguf_imports_exactly(gguf_pair, tmp_path):
    folder, reference = gguf_pair
    result = run_cli("mlx_gemma3.convert", "--gguf", str(folder / "text.gguf"), "--mlx-path", str(tmp_path / "mlx"))
    assert result.returncode == 0, result.stderr
    model, processor = mlx_gemma3.load(tmp_path / "mlx")
    ids = random_ids(3 * TINY_TEXT["sliding_window"])
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids)).logits.float().numpy()
    assert np.abs(np.array(model(mx.array(ids))) - expected).max() <= 1e-4
    quantized = {
        k.removesuffix(".scales") for k in mx.load(str(tmp_path / "mlx" / "model.safetensors")) if k.endswith(".scales")
    }
    assert "model.layers.0.self_attn.q_proj" in quantized and "model.embed_tokens" in quantized  # Q4_0, Q8_0 kept
    assert "model.layers.0.mlp.down_proj" not in quantized  # Q5_0 dequantized
    source = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))  # the GGUF's source
    for text in TOKENIZER_TEXTS:
        assert processor.tokenizer.encode(text, add_bos=False) == source.encode(text), text


def test_mmproj_pair_imports_the_vision_tower(gguf_pair, tmp_path):
    folder, reference = gguf_pair
    args = (
        "--gguf",
        str(folder / "text.gguf"),
        "--mmproj",
        str(folder / "mmproj.gguf"),
        "--mlx-path",
        str(tmp_path / "mlx"),
    )
    result = run_cli("mlx_gemma3.convert", *args)
    assert result.returncode == 0, result.stderr
    model, _ = mlx_gemma3.load(tmp_path / "mlx")
    ids = random_ids(30)
    ids[0, 5:11] = [107, 109, 109, 109, 109, 108]
    pixels = (
        np.random.RandomState(1)
        .uniform(-1, 1, (1, TINY_VISION["image_size"], TINY_VISION["image_size"], 3))
        .astype(np.float32)
    )
    with torch.no_grad():
        expected = (
            reference(
                input_ids=torch.tensor(ids),
                pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                token_type_ids=torch.tensor((ids == 109).astype(np.int64)),
            )
            .logits.float()
            .numpy()
        )
    ours = np.array(model(mx.array(ids), pixel_values=mx.array(pixels)))
    assert np.abs(ours - expected).max() <= 2e-4  # test_vision.TOLERANCE


def set_tensor_count(path: Path, count: int) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = struct.pack("<Q", count)  # after magic and version
    path.write_bytes(bytes(data))


BAD = {
    "wrong magic": (lambda p: p.write_bytes(b"GGUX" + p.read_bytes()[4:]), "not GGUF"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
    "tensor count beyond the file": (lambda p: set_tensor_count(p, 10_000), "truncated or not GGUF"),
    "unknown architecture": (None, "is not Gemma 3"),
    "missing tokenizer keys": (None, "tokenizer.ggml"),
}


def write_foreign(path: Path, arch: str, tokenizer: bool, folder: Path) -> None:
    writer = gguf.GGUFWriter(path, arch)
    for key, value in {
        "context_length": 64,
        "embedding_length": 64,
        "block_count": 1,
        "feed_forward_length": 128,
        "attention.head_count": 4,
        "attention.sliding_window": 16,
    }.items():
        writer.add_uint32(f"{arch}.{key}", value)
    if tokenizer:
        add_tokenizer(writer, folder)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


@pytest.mark.parametrize("case", BAD)
def test_bad_gguf_is_one_line_and_leaves_nothing(gguf_pair, tmp_path, case):
    import shutil

    folder, _ = gguf_pair
    damage, message = BAD[case]
    path = tmp_path / "bad.gguf"
    if case == "unknown architecture":
        write_foreign(path, "llama", True, tmp_path)
    elif case == "missing tokenizer keys":
        write_foreign(path, "gemma3", False, tmp_path)
    else:
        shutil.copyfile(folder / "text.gguf", path)
        damage(path)
    out = tmp_path / "out"
    result = run_cli("mlx_gemma3.convert", "--gguf", str(path), "--mlx-path", str(out))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in lines[0] and "Traceback" not in result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def gguf_and_reference(path: Path, seed: int):
    """A tiny text GGUF at `path` and transformers running exactly the weights GGML reads back from it."""
    model = tiny_multimodal_model(seed=seed, image_tokens=SPM_IMAGE_TOKENS)
    stored = write_text_gguf(path, model, path.parent)
    model.load_state_dict({k: torch.tensor(v) for k, v in stored.items()}, strict=False)
    return model.eval()


def test_gguf_cache_is_keyed_by_content(tmp_path, monkeypatch, capsys):
    from mlx_gemma3.cli import model_folder

    monkeypatch.setenv("MLX_GEMMA3_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    references = {
        name: gguf_and_reference(tmp_path / name / "model.gguf", seed) for name, seed in (("a", 11), ("b", 12))
    }
    first, second = (tmp_path / name / "model.gguf" for name in "ab")
    assert first.stat().st_size == second.stat().st_size and first.read_bytes() != second.read_bytes()
    path = tmp_path / "model.gguf"
    path.write_bytes(first.read_bytes())
    folder_a = model_folder(str(path))
    path.write_bytes(second.read_bytes())  # the same name and size, other weights
    folder_b = model_folder(str(path))
    assert folder_a != folder_b and capsys.readouterr().err.count("converting") == 2
    ids = random_ids(20)
    for name, folder in (("a", folder_a), ("b", folder_b)):
        model, _ = mlx_gemma3.load(folder)
        with torch.no_grad():
            expected = references[name](input_ids=torch.tensor(ids)).logits.float().numpy()
        assert np.abs(np.array(model(mx.array(ids))) - expected).max() <= 1e-4, name
    assert model_folder(str(path)) == folder_b and model_folder(str(first)) == folder_a  # a copy reuses it
    assert "converting" not in capsys.readouterr().err


def test_q_requantizes_tensors_stored_above_the_bits_asked(gguf_pair, tmp_path):
    import json

    folder, _ = gguf_pair
    result = run_cli(
        "mlx_gemma3.convert", "--gguf", str(folder / "text.gguf"), "--mlx-path", str(tmp_path / "mlx"), "-q"
    )
    assert result.returncode == 0, result.stderr
    block = json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]
    assert block["bits"] == 4 and block["group_size"] == 64
    assert block["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4}  # Q4_0: kept, lossless
    for path in ("model.embed_tokens", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"):
        assert path not in block  # Q8_0, Q8_0, Q5_0: requantized to 4-bit group 64
    summary = [line for line in result.stderr.splitlines() if line.startswith("requantized")]
    # 6 layers: k, v, o and gate stored F32, up Q8_0 (and the embedding), down Q5_0, q Q4_0 (QUANTIZED)
    assert summary == [
        "requantized 37 tensors (24 F32, 7 Q8_0, 6 Q5_0) to 4-bit, group 64; "
        "kept 6 as stored (Q4_0): lossless 4-bit, not above the 4 bits asked"
    ]


def test_q_bits_alone_implies_q(gguf_pair, tmp_path):
    import json

    folder, _ = gguf_pair
    result = run_cli(
        "mlx_gemma3.convert", "--gguf", str(folder / "text.gguf"), "--mlx-path", str(tmp_path / "mlx"), "--q-bits", "8"
    )
    assert result.returncode == 0, result.stderr
    block = json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]
    assert block["bits"] == 8 and block["group_size"] == 64
    assert block["model.embed_tokens"] == {"group_size": 32, "bits": 8}  # Q8_0: kept, at the 8 bits asked
    assert block["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4}  # Q4_0: kept
    assert "model.layers.0.mlp.down_proj" not in block  # Q5_0: quantized to 8-bit group 64
    assert "requantized 30 tensors (24 F32, 6 Q5_0) to 8-bit, group 64; kept 7 as stored (Q8_0)" in result.stderr


@pytest.mark.slow
def test_qlora_on_a_lossless_gguf_import_matches_peft(gguf_pair, tmp_path):
    """LoRA over the Q4_0/Q8_0 layers kept quantized from the GGUF: loss and A/B gradients equal peft's on the
    weights GGML reads back."""
    import mlx.nn as nn
    from test_finetune import (
        ALPHA,
        RANK,
        TOL,
        as_ours,
        assert_gradients_match,
        ids_and_weights,
        our_gradients,
        peft_parameters,
        reference_loss,
        with_peft,
    )

    from mlx_gemma3.convert.__main__ import main as convert_main
    from mlx_gemma3.train.adapters import AdapterConfig, prepare_for_training

    folder, reference = gguf_pair
    assert convert_main(["--gguf", str(folder / "text.gguf"), "--mlx-path", str(tmp_path / "mlx")]) == 0
    model, _ = mlx_gemma3.load(tmp_path / "mlx", for_training=True)
    prepare_for_training(model, AdapterConfig("lora", -1, RANK, ALPHA / RANK))
    assert isinstance(model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)  # Q4_0, trained over as it is
    peft_model = with_peft(copy.deepcopy(reference))
    expected_grads = peft_parameters(peft_model, "model.")
    model.load_weights([(key, as_ours(param)) for key, param in expected_grads.items()], strict=False)
    ids, weights = ids_and_weights(True)
    expected = reference_loss(peft_model(input_ids=torch.tensor(ids)).logits, ids, weights)
    expected.backward()
    loss, grads = our_gradients(model, ids, weights)
    assert abs(loss - expected.item()) <= TOL * max(1.0, abs(expected.item()))
    assert_gradients_match(grads, expected_grads)
