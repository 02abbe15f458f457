"""Images against transformers' Gemma3ForConditionalGeneration: vision tower, projector, splicing, image-block masks."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import SPM_IMAGE_TOKENS, TINY_IMAGE_TOKENS, TINY_VISION, convert, log_softmax, tiny_multimodal_model

import mlx_gemma3

BOI, EOI, IMG = (TINY_IMAGE_TOKENS[k] for k in ("boi_token_index", "eoi_token_index", "image_token_index"))
SIZE = TINY_VISION["image_size"]
# float32 rounding through the vision tower reaches 1.2e-4 on logits of magnitude ~60 (3e-6 relative).
TOLERANCE = 2e-4


def prompt_with_images(pieces: list, tokens_per_image: int, seed: int = 0) -> np.ndarray:
    """Token ids for text runs (ints: that many random tokens) and images ("image") in order, BOS first."""
    rng = np.random.RandomState(seed)
    ids = [2]
    for piece in pieces:
        if piece == "image":
            ids += [BOI, *[IMG] * tokens_per_image, EOI]
        else:
            ids += rng.randint(3, 500, size=piece).tolist()
    return np.array([ids])


def reference(model, ids: np.ndarray, pixels: np.ndarray, bidirectional: bool = True) -> np.ndarray:
    """transformers' logits; token_type_ids mark image tokens as the processor does (None: causal only)."""
    token_types = torch.tensor((ids == IMG).astype(np.int64)) if bidirectional else None
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
            token_type_ids=token_types,
        )
    return out.logits.float().numpy()


@pytest.fixture(scope="module")
def converted(converted_tiny):
    """(our model, transformers model) per (tokens per image, sliding window)."""
    loaded = {}

    def get(tokens_per_image: int = 4, window: int = 16):
        if (tokens_per_image, window) not in loaded:
            tiny = converted_tiny(
                dict(sliding_window=window),
                seed=4,
                vision=True,
                tokens_per_image=tokens_per_image,
                image_tokens=TINY_IMAGE_TOKENS,
            )
            loaded[tokens_per_image, window] = mlx_gemma3.load(tiny.folder)[0], tiny.reference
        return loaded[tokens_per_image, window]

    return get


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).uniform(-1, 1, size=(n, SIZE, SIZE, 3)).astype(np.float32)


CASES = {
    "one image": (4, 16, [5, "image", 7]),
    "two images between text": (4, 16, [3, "image", 6, "image", 4]),
    "image longer than the window": (16, 8, [4, "image", 9]),
    "adjacent images": (4, 16, [2, "image", "image", 30]),
}


@pytest.mark.parametrize("case", CASES)
def test_image_prompts_match_transformers(converted, case):
    tokens_per_image, window, pieces = CASES[case]
    model, hf = converted(tokens_per_image, window)
    ids = prompt_with_images(pieces, tokens_per_image)
    images = pixels(pieces.count("image"))
    expected = reference(hf, ids, images)
    ours = np.array(model(mx.array(ids), pixel_values=mx.array(images)))
    assert np.abs(ours - expected).max() <= TOLERANCE
    causal_only = reference(hf, ids, images, bidirectional=False)
    assert np.abs(causal_only - expected).max() > 1e-2  # the image blocks really change the result


def test_image_features_match_transformers(converted):
    model, hf = converted()
    images = pixels(3, seed=1)
    with torch.no_grad():
        expected = hf.model.get_image_features(torch.tensor(images).permute(0, 3, 1, 2))
    expected = getattr(expected, "pooler_output", expected)
    expected = (expected if isinstance(expected, torch.Tensor) else torch.stack(list(expected))).numpy()
    ours = np.array(model.encode_images(mx.array(images)))
    assert np.abs(ours - expected.reshape(ours.shape)).max() <= 1e-4


def test_chunked_prefill_with_an_image_then_decode(converted):
    model, hf = converted()
    ids = prompt_with_images([20, "image", 25], 4)
    images = pixels(1)
    expected = reference(hf, ids, images)
    start = int(np.flatnonzero(ids[0] == IMG)[0])
    cache = model.make_cache()
    parts = [
        model(mx.array(ids[:, : start - 3]), cache=cache),
        model(mx.array(ids[:, start - 3 : start + 9]), pixel_values=mx.array(images), cache=cache),
        *(model(mx.array(ids[:, i : i + 1]), cache=cache) for i in range(start + 9, ids.shape[1])),
    ]
    ours = np.concatenate([np.array(p) for p in parts], axis=1)
    assert np.abs(ours - expected).max() <= TOLERANCE


def test_image_token_count_mismatch_is_an_error(converted):
    model, _ = converted()
    ids = prompt_with_images([3, "image", 3], 4)
    with pytest.raises(mlx_gemma3.Gemma3Error, match="8 features"):
        model(mx.array(ids), pixel_values=mx.array(pixels(2)))


def random_picture(path, width: int, height: int, seed: int = 3):
    from PIL import Image

    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return Image.open(path).convert("RGB")


def test_greedy_generation_with_an_image_matches_transformers(image_chat_model, tmp_path):
    from mlx_gemma3.generation.text_stream import stream_generate
    from mlx_gemma3.processing.prompt import gemma_chat

    _, model, processor, hf, hf_processor = image_chat_model
    picture = random_picture(tmp_path / "a.png", 90, 70)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": str(tmp_path / "a.png")}, {"type": "text", "text": "What is this?"}],
        }
    ]
    inputs = hf_processor(text=gemma_chat(messages).removeprefix("<bos>"), images=[picture], return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=50, do_sample=False, eos_token_id=[1, 106], pad_token_id=0)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    responses = list(stream_generate(model, processor, messages, max_tokens=50))
    assert responses[0].prompt_tokens == inputs["input_ids"].shape[1]
    assert [r.token for r in responses] == expected


def test_pan_and_scan_prompt_matches_transformers(image_chat_model, tmp_path):
    from mlx_gemma3.generation.text_stream import Options, prepare_prompt

    _, model, processor, hf, hf_processor = image_chat_model
    wide = random_picture(tmp_path / "wide.png", 1200, 300)
    text = "Look <start_of_image> closely."
    inputs = hf_processor(text=text, images=[wide], do_pan_and_scan=True, return_tensors="pt")
    ids, features = prepare_prompt(
        model, processor, text, [str(tmp_path / "wide.png")], Options(use_chat_template=False, pan_and_scan=True)
    )
    assert ids == inputs["input_ids"][0].tolist() and features.shape[0] == 5  # the image and 4 crops
    with torch.no_grad():
        expected = hf(**inputs).logits.float().numpy()
    with torch.no_grad():
        causal = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits.float().numpy()
    ours = np.array(model(mx.array([ids]), image_features=features))
    assert np.abs(ours - expected).max() <= TOLERANCE
    assert np.abs(causal - expected).max() > 1e-2


def test_chat_encodes_an_image_once_and_matches_a_single_pass(image_chat_model, tmp_path):
    _, model, processor, hf, hf_processor = image_chat_model
    from mlx_gemma3.processing.prompt import gemma_chat

    random_picture(tmp_path / "a.png", 64, 64)
    chat = mlx_gemma3.Chat(model, processor, max_tokens=8)
    calls = []
    original = model.encode_images
    model.encode_images = lambda pixels: calls.append(pixels.shape[0]) or original(pixels)
    try:
        chat.send("Describe it.", images=[str(tmp_path / "a.png")])
        chat.send("Again, the same image.", images=[str(tmp_path / "a.png")])
        second = list(chat.stream("And once more?"))
    finally:
        del model.encode_images
    assert calls == [1]  # three turns, two images in the conversation, one encoding
    from PIL import Image

    picture = Image.open(tmp_path / "a.png").convert("RGB")
    text = gemma_chat(chat.conversation()[:-1]).removeprefix("<bos>")
    inputs = hf_processor(text=text, images=[picture, picture], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist() + [r.token for r in second]
    with torch.no_grad():
        logits = (
            hf(
                input_ids=torch.tensor([ids]),
                pixel_values=inputs["pixel_values"],
                token_type_ids=torch.tensor([[int(t == SPM_IMAGE_TOKENS["image_token_index"]) for t in ids]]),
            )
            .logits[0]
            .float()
            .numpy()
        )
    start = inputs["input_ids"].shape[1]
    expected = log_softmax(logits[start - 1 : len(ids) - 1])
    assert second[-1].prompt_tokens < start // 2
    assert np.abs(np.stack([np.array(r.logprobs) for r in second]) - expected).max() <= TOLERANCE


def test_generate_cli_with_an_image(image_chat_model, tmp_path):
    from conftest import run_cli

    from mlx_gemma3.processing.prompt import gemma_chat

    folder, _, processor, hf, hf_processor = image_chat_model
    picture = random_picture(tmp_path / "a.png", 80, 50)
    args = ("--model", str(folder), "--prompt", "What is it?", "--image", str(tmp_path / "a.png"), "--max-tokens", "10")
    result = run_cli("mlx_gemma3.generate", *args)
    assert result.returncode == 0, result.stderr
    text = gemma_chat([{"role": "user", "content": "<start_of_image> What is it?"}]).removeprefix("<bos>")
    inputs = hf_processor(text=text, images=[picture], return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=[1, 106], pad_token_id=0)
    new = [t for t in out[0, inputs["input_ids"].shape[1] :].tolist() if t not in (1, 106)]
    assert result.stdout == processor.tokenizer.decode(new) + "\n"


def bad_images(folder):
    import io

    from PIL import Image

    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image at all")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    (folder / "cut.png").write_bytes(buffer.getvalue()[:-40])
    big = Image.new("1", (9000, 8000))
    big.save(folder / "huge.png")
    return {"empty.png": "empty", "text.png": "not an image", "cut.png": "truncated", "huge.png": "pixels"}


@pytest.mark.slow
def test_generate_cli_bad_images_are_one_line(image_chat_model, tmp_path):
    from conftest import run_cli

    folder = image_chat_model[0]
    for name, message in {**bad_images(tmp_path), "missing.png": "does not exist"}.items():
        args = ("--model", str(folder), "--prompt", "hi", "--image", str(tmp_path / name))
        result = run_cli("mlx_gemma3.generate", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        assert message in lines[0].lower() and name in lines[0], lines[0]


def test_text_only_model_refuses_images(tmp_path):
    from conftest import run_cli, tiny_text_model

    tiny_text_model().save_pretrained(tmp_path / "hf")
    from spm_fixture import train_tokenizer

    train_tokenizer(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx")
    random_picture(tmp_path / "a.png", 20, 20)
    result = run_cli(
        "mlx_gemma3.generate", "--model", str(tmp_path / "mlx"), "--prompt", "hi", "--image", str(tmp_path / "a.png")
    )
    assert result.returncode == 1 and "reads text only" in result.stderr and result.stderr.count("\n") == 1


def test_text_only_use_leaves_the_vision_weights_on_disk(tmp_path):
    """A text prompt on a multimodal folder never reads the vision tower (measured in a fresh process)."""
    import subprocess
    import sys

    wide_vision = dict(hidden_size=256, intermediate_size=512)
    hf = tiny_multimodal_model(image_tokens=TINY_IMAGE_TOKENS)
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=hf.config.text_config.to_dict(),
        vision_config={**TINY_VISION, **wide_vision},
        mm_tokens_per_image=4,
        **TINY_IMAGE_TOKENS,
    )
    Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx", "--dtype", "float32")
    script = (
        "import mlx.core as mx, mlx_gemma3\n"
        "from mlx.utils import tree_flatten\n"
        f"model, _ = mlx_gemma3.load({str(tmp_path / 'mlx')!r})\n"
        "mx.eval(model(mx.array([[2, 10, 11, 12]])))\n"
        "size = lambda m: sum(v.nbytes for _, v in tree_flatten(m.parameters()))\n"
        "print(mx.get_active_memory(), size(model.language_model), size(model.vision_tower))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    active, text_bytes, vision_bytes = map(int, result.stdout.split())
    assert vision_bytes > 4 * text_bytes  # the vision tower dominates this folder
    assert active < text_bytes + vision_bytes / 4, (active, text_bytes, vision_bytes)
