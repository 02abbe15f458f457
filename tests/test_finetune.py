"""Fine-tuning against torch + peft: loss and gradients of LoRA, DoRA, QLoRA and full fine-tuning, with and without
--mask-prompt, gradient checkpointing and an image; fuse; exact resume; bad data."""

from __future__ import annotations

import dataclasses
import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import (
    SPM_IMAGE_TOKENS,
    TINY_IMAGE_TOKENS,
    TINY_VISION,
    convert,
    random_ids,
    reference_torch,
    tiny_multimodal_model,
    tiny_text_model,
)
from mlx.utils import tree_flatten

import mlx_gemma3
from mlx_gemma3.train.adapters import DEFAULT_KEYS, AdapterConfig, fuse_adapters, prepare_for_training, save_adapters
from mlx_gemma3.train.loss import Batch, default_loss

TOL = 1e-4
RANK, ALPHA = 4, 8
TARGETS = sorted({key.split(".")[-1] for key in DEFAULT_KEYS})
PEFT_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_A|lora_B|lora_magnitude_vector)")
OURS = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "m"}


def ids_and_weights(mask_prompt: bool, seed: int = 1, length: int = 24):
    """Two rows longer than the sliding window (16); with mask_prompt only some tokens count (as an assistant turn)."""
    ids = random_ids(length, vocab=500, batch=2, seed=seed)
    weights = np.ones(ids.shape, np.float32)
    weights[:, 0] = 0
    if mask_prompt:
        weights[0, :10] = 0
        weights[1, :5] = 0
        weights[1, 20:] = 0
    return ids, weights


def reference_loss(logits, ids: np.ndarray, weights: np.ndarray):
    """The mean cross-entropy of the counted tokens, in torch."""
    torch = reference_torch()
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), torch.tensor(ids[:, 1:]).reshape(-1), reduction="none"
    )
    w = torch.tensor(weights[:, 1:]).reshape(-1)
    return (ce * w).sum() / w.sum()


def with_peft(hf, dora: bool = False, seed: int = 0):
    """hf wrapped by peft (rank 4, alpha 8, every projection of the language model, none of the vision tower) with
    random A, B (and magnitude) so every gradient matters."""
    from peft import LoraConfig, get_peft_model

    torch = reference_torch()
    targets = rf"^(?!.*vision_tower).*\.({'|'.join(TARGETS)})$"
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0, use_dora=dora)
    model = get_peft_model(hf, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=gen))
    return model


def peft_parameters(peft_model, prefix: str) -> dict:
    """Our parameter path → peft's parameter, for every adapter matrix (and DoRA magnitude)."""
    found = {}
    for name, param in peft_model.named_parameters():
        match = PEFT_KEY.search(name)
        assert "vision_tower" not in name or not match
        if match:
            layer, block, proj, kind = match.groups()
            found[f"{prefix}layers.{layer}.{block}.{proj}.{OURS[kind]}"] = param
    return found


def as_ours(param) -> mx.array:
    value = param.detach().numpy()
    return mx.array(value.T if value.ndim == 2 else value)


def our_gradients(model, ids, weights, pixels=None, grad_checkpoint=False):
    batch = Batch(mx.array(ids), mx.array(weights), None if pixels is None else mx.array(pixels))
    (loss, _), grads = nn.value_and_grad(model, lambda b: default_loss(model, b, grad_checkpoint))(batch)
    return loss.item(), dict(tree_flatten(grads))


def assert_gradients_match(ours: dict, reference: dict, transposed: bool = True):
    """`transposed`: peft's A and B are stored [r, in] and [out, r], ours [in, r] and [r, out]."""
    assert set(ours) == set(reference)
    for key, param in reference.items():
        expected = param.grad.numpy()
        expected = expected.T if expected.ndim == 2 and transposed else expected
        assert np.abs(np.array(ours[key]) - expected).max() <= TOL, key


@pytest.fixture(scope="module")
def text_folder(converted_tiny):
    tiny = converted_tiny(seed=3)
    return tiny.folder, tiny.hf


def adapted(folder, kind: str, peft_model, prefix: str = "model."):
    model, _ = mlx_gemma3.load(folder, for_training=True)
    prepare_for_training(model, AdapterConfig(kind, -1, RANK, ALPHA / RANK))
    reference = peft_parameters(peft_model, prefix)
    model.load_weights([(key, as_ours(param)) for key, param in reference.items()], strict=False)
    return model, reference


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("mask_prompt", [False, True], ids=["all tokens", "mask prompt"])
def test_adapter_gradients_match_peft(text_folder, kind, mask_prompt):
    from transformers import AutoModelForCausalLM

    mlx_folder, hf_folder = text_folder
    peft_model = with_peft(AutoModelForCausalLM.from_pretrained(hf_folder), dora=kind == "dora")
    model, reference = adapted(mlx_folder, kind, peft_model)
    ids, weights = ids_and_weights(mask_prompt)
    expected = reference_loss(peft_model(reference_torch().tensor(ids)).logits, ids, weights)
    expected.backward()
    loss, grads = our_gradients(model, ids, weights)
    assert abs(loss - expected.item()) <= TOL * max(1.0, abs(expected.item()))
    assert_gradients_match(grads, reference)
    checkpointed = our_gradients(model, ids, weights, grad_checkpoint=True)[1]
    assert all(np.array_equal(np.array(grads[k]), np.array(checkpointed[k])) for k in grads)


@pytest.mark.slow
def test_full_fine_tuning_gradients_match_torch(text_folder):
    from transformers import AutoModelForCausalLM

    mlx_folder, hf_folder = text_folder
    hf = AutoModelForCausalLM.from_pretrained(hf_folder)
    model, _ = mlx_gemma3.load(mlx_folder, for_training=True)
    prepare_for_training(model, AdapterConfig("full"))
    ids, weights = ids_and_weights(True)
    expected = reference_loss(hf(reference_torch().tensor(ids)).logits, ids, weights)
    expected.backward()
    loss, grads = our_gradients(model, ids, weights)
    assert abs(loss - expected.item()) <= TOL * max(1.0, abs(expected.item()))
    assert_gradients_match(
        grads, dict(hf.named_parameters()), transposed=False
    )  # every weight (the tied head is the embedding)


@pytest.mark.slow
def test_qlora_gradients_match_peft_on_the_dequantized_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_text_model(seed=5).save_pretrained(tmp_path / "hf")
    quantized = convert(tmp_path / "hf", tmp_path / "q4", "-q")
    base, _ = mlx_gemma3.load(quantized, for_training=True)
    dense = {k: v for k, v in fuse_dequantized(base).items()}
    torch = reference_torch()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf.load_state_dict({k: torch.tensor(np.array(v)) for k, v in dense.items()}, strict=False)
    assert set(dense) == {k for k, _ in hf.named_parameters()}
    peft_model = with_peft(hf)
    model, reference = adapted(quantized, "lora", peft_model)
    assert isinstance(model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)  # no dense copy of the base
    ids, weights = ids_and_weights(True)
    expected = reference_loss(peft_model(torch.tensor(ids)).logits, ids, weights)
    expected.backward()
    loss, grads = our_gradients(model, ids, weights)
    assert abs(loss - expected.item()) <= TOL * max(1.0, abs(expected.item()))
    assert_gradients_match(grads, reference)


def fuse_dequantized(model) -> dict[str, mx.array]:
    fuse_adapters(model, dequantize=True)
    return dict(tree_flatten(model.parameters()))


@pytest.mark.slow
def test_multimodal_lora_with_an_image_matches_peft(tmp_path):
    torch = reference_torch()
    hf = tiny_multimodal_model(seed=4, image_tokens=TINY_IMAGE_TOKENS)
    hf.save_pretrained(tmp_path / "hf")
    folder = convert(tmp_path / "hf", tmp_path / "mlx")
    peft_model = with_peft(hf)
    model, reference = adapted(folder, "lora", peft_model, prefix="language_model.model.")
    boi, img, eoi = (TINY_IMAGE_TOKENS[k] for k in ("boi_token_index", "image_token_index", "eoi_token_index"))
    ids = np.array([[2, 40, 41, boi, *[img] * 4, eoi, *random_ids(14, vocab=500, seed=2)[0]]])
    weights = (np.arange(ids.shape[1]) >= 10).astype(np.float32)[None]
    size = TINY_VISION["image_size"]
    pixels = np.random.RandomState(0).uniform(-1, 1, size=(1, size, size, 3)).astype(np.float32)
    logits = peft_model(
        input_ids=torch.tensor(ids),
        pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
        token_type_ids=torch.tensor((ids == img).astype(np.int64)),
    ).logits
    expected = reference_loss(logits, ids, weights)
    expected.backward()
    loss, grads = our_gradients(model, ids, weights, pixels)
    assert abs(loss - expected.item()) <= TOL * max(1.0, abs(expected.item()))
    projector = {
        f"multi_modal_projector.{name}": param
        for name, param in peft_model.base_model.model.model.multi_modal_projector.named_parameters()
    }
    for param in projector.values():  # peft freezes the base; the projector trains here as in ours
        assert param.grad is None
    assert set(grads) == set(reference) | set(projector)
    assert_gradients_match({k: v for k, v in grads.items() if k in reference}, reference)
    assert not any(k.startswith("vision_tower") for k in grads)  # the vision tower stays frozen


def trained_adapters(folder, kind: str, seed: int = 7):
    """A model with adapters whose B (and magnitude) are random, as after some training: (model, config)."""
    model, _ = mlx_gemma3.load(folder, for_training=True)
    config = AdapterConfig(kind, 4, RANK, ALPHA / RANK)
    prepare_for_training(model, config)
    rng = np.random.RandomState(seed)
    updates = [
        (k, mx.array(rng.normal(0, 0.1, v.shape).astype(np.float32)))
        for k, v in tree_flatten(model.trainable_parameters())
        if k.endswith("lora_b")
    ]
    model.load_weights(updates, strict=False)
    return model, config


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fused_model_equals_the_adapter_model_here_and_in_mlx_lm(text_folder, tmp_path, kind):
    import mlx_lm

    from mlx_gemma3.train.fused_folder import fuse_folder

    model, config = trained_adapters(text_folder[0], kind)
    save_adapters(model, tmp_path / "adapters", config.as_json())
    ids = random_ids(30, vocab=500, seed=4)
    adapter_model, _ = mlx_gemma3.load(text_folder[0], adapter_path=tmp_path / "adapters")
    expected = np.array(adapter_model(mx.array(ids)))
    assert np.abs(expected - np.array(model(mx.array(ids)))).max() <= TOL  # the saved adapters are the trained ones
    fuse_folder(text_folder[0], tmp_path / "adapters", tmp_path / "fused")
    fused, _ = mlx_gemma3.load(tmp_path / "fused")
    assert np.abs(np.array(fused(mx.array(ids))) - expected).max() <= TOL
    theirs, _ = mlx_lm.load(str(tmp_path / "fused"))
    assert np.abs(np.array(theirs(mx.array(ids))) - expected).max() <= TOL
    with_their_adapters, _ = mlx_lm.load(str(text_folder[0]), adapter_path=str(tmp_path / "adapters"))
    assert np.abs(np.array(with_their_adapters(mx.array(ids))) - expected).max() <= TOL


@pytest.mark.slow
def test_fuse_of_a_quantized_base_keeps_or_drops_the_quantization(tmp_path):
    from mlx_gemma3.train.fused_folder import fuse_folder

    tiny_text_model(seed=5).save_pretrained(tmp_path / "hf")
    quantized = convert(tmp_path / "hf", tmp_path / "q4", "-q")
    model, config = trained_adapters(quantized, "lora")
    save_adapters(model, tmp_path / "adapters", config.as_json())
    ids = random_ids(20, vocab=500, seed=4)
    expected = np.array(model(mx.array(ids)))
    fuse_folder(quantized, tmp_path / "adapters", tmp_path / "dense", dequantize=True)
    assert "quantization" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert np.abs(np.array(mlx_gemma3.load(tmp_path / "dense")[0](mx.array(ids))) - expected).max() <= TOL
    fuse_folder(quantized, tmp_path / "adapters", tmp_path / "requantized")
    requantized, _ = mlx_gemma3.load(tmp_path / "requantized")
    assert isinstance(requantized.layers[-1].self_attn.q_proj, nn.QuantizedLinear)


def tiny_training_set(n: int = 6, length: int = 12) -> list:
    from mlx_gemma3.train.data import Example

    rng = np.random.RandomState(0)
    return [Example(rng.randint(3, 500, size=length).tolist(), [0] + [1] * (length - 1)) for _ in range(n)]


class Interrupted(Exception):
    pass


def run_training(folder, out, stop_after: int | None = None, resume_run: bool = False) -> list[float]:
    """6 steps (cosine schedule with warmup, dropout) saving every 3; `stop_after`: interrupted once that step is saved."""
    from mlx_gemma3.train.trainer import TrainingArgs, make_optimizer, resume, train

    mx.random.seed(0)
    model, _ = mlx_gemma3.load(folder, for_training=True)
    config = AdapterConfig("lora", -1, RANK, 2.0, 0.1)
    prepare_for_training(model, config)
    args = TrainingArgs(
        batch_size=2,
        iters=6,
        learning_rate=1e-2,
        lr_schedule="cosine",
        warmup=2,
        steps_per_report=100,
        save_every=3,
        adapter_path=out,
    )
    optimizer = make_optimizer(args)
    start = resume(model, optimizer, out / "adapters.safetensors") if resume_run else 0
    losses = []

    def report(event):
        if event["kind"] == "save" and event["step"] == stop_after:
            raise Interrupted

    try:
        losses += train(
            model, optimizer, tiny_training_set(), None, args, config.as_json(), report=report, start_step=start
        )
    except Interrupted:
        pass
    return losses


@pytest.mark.slow
def test_resumed_training_follows_the_same_trajectory(text_folder, tmp_path):
    whole = run_training(text_folder[0], tmp_path / "whole")
    run_training(text_folder[0], tmp_path / "split", stop_after=3)
    second = run_training(text_folder[0], tmp_path / "split", resume_run=True)
    assert len(whole) == 6 and len(second) == 3
    assert np.allclose(second, whole[3:], rtol=0, atol=1e-6)
    assert whole[-1] < whole[0]


BAD_LINES = {
    "not json": ("{oops", "not valid JSON"),
    "unknown record": ('{"question": "a"}', "unknown record"),
    "roles out of order": ('{"messages": [{"role": "assistant", "content": "x"}]}', "alternate"),
    "image for a text model": (
        '{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]}]}',
        "reads text only",
    ),
    "no assistant turn to learn": ('{"messages": [{"role": "user", "content": "hi"}]}', "has none"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_a_bad_line_is_reported_with_its_file_and_line(tiny_chat_model, tmp_path, case):
    from mlx_gemma3.train.data import Encoder, load_splits

    line, message = BAD_LINES[case]
    good = json.dumps({"prompt": "What is one?", "completion": "One."})
    (tmp_path / "train.jsonl").write_text(f"{good}\n{good}\n{line}\n")
    (tmp_path / "valid.jsonl").write_text(f"{good}\n")
    _, processor = mlx_gemma3.load(tiny_chat_model[0])
    with pytest.raises(mlx_gemma3.Gemma3Error, match=rf"train\.jsonl:3: .*{message}"):
        load_splits(tmp_path, Encoder(processor, mask_prompt=True), ("train", "valid"))


def test_mask_prompt_counts_only_the_assistant_turns(tiny_chat_model, tmp_path):
    from mlx_gemma3.processing.prompt import chat_text
    from mlx_gemma3.train.data import Encoder

    _, processor = mlx_gemma3.load(tiny_chat_model[0])
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye now"},
        {"role": "assistant", "content": "Farewell"},
    ]
    example = Encoder(processor, mask_prompt=True).example({"messages": messages}, tmp_path, "x:1")
    counted = [t for t, w in zip(example.ids, example.weights) if w]
    # Each reply as the template renders it after "<start_of_turn>model\n": its text and "<end_of_turn>\n".
    turns = chat_text(messages, processor.chat_template, False).split("<start_of_turn>model\n")[1:]
    replies = [turn.split("<end_of_turn>\n")[0] + "<end_of_turn>\n" for turn in turns]
    expected = [t for reply in replies for t in processor.tokenizer.encode(reply, add_bos=False)]
    assert counted == expected
    unmasked = Encoder(processor).example({"messages": messages}, tmp_path, "x:1")
    assert unmasked.ids == example.ids and sum(unmasked.weights) == len(example.ids) - 1


@pytest.mark.slow
def test_an_image_sample_trains_as_transformers_computes_it(image_chat_model, tmp_path):
    """Through the data pipeline: a messages line with an image file encodes as Gemma3Processor does, and the
    masked loss and the projector's gradient equal transformers' on that input (fresh LoRA: B = 0)."""
    from PIL import Image

    from mlx_gemma3.processing.prompt import chat_text
    from mlx_gemma3.train.data import Encoder, collate

    reference_torch()  # one thread
    folder, _, processor, hf, hf_processor = image_chat_model
    picture = Image.fromarray(np.random.RandomState(3).randint(0, 256, size=(40, 60, 3), dtype=np.uint8))
    picture.save(tmp_path / "pic.png")
    messages = [
        {"role": "user", "content": [{"type": "image", "image": "pic.png"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A picture."},
    ]
    example = Encoder(processor, mask_prompt=True).example({"messages": messages}, tmp_path, "line 1")
    text = chat_text(messages, processor.chat_template, add_generation_prompt=False).removeprefix("<bos>")
    inputs = hf_processor(text=text, images=[picture], return_tensors="pt")
    assert example.ids == inputs["input_ids"][0].tolist()
    assert np.array_equal(example.pixels, inputs["pixel_values"].permute(0, 2, 3, 1).numpy())

    model, _ = mlx_gemma3.load(folder, for_training=True)
    prepare_for_training(model, AdapterConfig("lora", -1, RANK, ALPHA / RANK))
    assert example.trailing_target  # mlx-lm's extra target past the end (test_training_parity); left out here
    batch = collate([dataclasses.replace(example, trailing_target=False)])
    (loss, count), grads = nn.value_and_grad(model, lambda b: default_loss(model, b))(batch)
    grads = dict(tree_flatten(grads))
    hf.zero_grad()
    assert inputs["token_type_ids"].tolist() == [[int(t == SPM_IMAGE_TOKENS["image_token_index"]) for t in example.ids]]
    logits = hf(**inputs).logits  # token_type_ids from the processor: each image attends to itself both ways
    expected = reference_loss(logits, inputs["input_ids"].numpy(), np.array([example.weights], np.float32))
    expected.backward()
    assert count.item() == len(processor.tokenizer.encode("A picture.<end_of_turn>\n", add_bos=False))
    assert abs(loss.item() - expected.item()) <= TOL * max(1.0, abs(expected.item()))
    for name, param in hf.model.multi_modal_projector.named_parameters():
        ours = np.array(grads[f"multi_modal_projector.{name}"])
        assert np.abs(ours - param.grad.numpy()).max() <= TOL, name
    hf.zero_grad()
