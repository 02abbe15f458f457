"""ShieldGemma 2: a tiny random classifier built with transformers, converted, scored against transformers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import mlx_gemma3
from conftest import FIXTURES, SPM_IMAGE_TOKENS, TINY_TEXT, TINY_VISION, convert, gemma3_processor, randomize, reference_torch
from mlx_gemma3 import shield

TOKENS_PER_IMAGE = 4
TEMPLATE = (FIXTURES / "shieldgemma2_chat_template.jinja").read_text()
CUSTOM = {"cats": "No Cats: The image shall not contain a cat.", "dangerous": "No Knives: The image shall not show a knife."}


def tiny_shield(yes_no: list[int]):
    from transformers import ShieldGemma2Config, ShieldGemma2ForImageClassification

    config = ShieldGemma2Config(
        text_config=TINY_TEXT, vision_config=TINY_VISION, mm_tokens_per_image=TOKENS_PER_IMAGE, **SPM_IMAGE_TOKENS,
        yes_token_index=yes_no[0], no_token_index=yes_no[1],
    )
    reference_torch().manual_seed(11)
    return randomize(ShieldGemma2ForImageClassification(config), seed=11)


def picture(path, width: int, height: int, seed: int):
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(folder, transformers model, transformers processor, [image paths]); folder/hf converted to folder/mlx."""
    from spm_fixture import train_tokenizer
    from transformers import ShieldGemma2Processor

    folder = tmp_path_factory.mktemp("shield")
    hf = folder / "hf"
    hf.mkdir()
    train_tokenizer(hf)
    base = gemma3_processor(hf, TINY_VISION["image_size"], TOKENS_PER_IMAGE)
    processor = ShieldGemma2Processor(base.image_processor, base.tokenizer, chat_template=TEMPLATE,
                                      image_seq_length=TOKENS_PER_IMAGE)
    yes_no = [ids[1] for ids in base.tokenizer(["Yes", "No"])["input_ids"]]  # as transformers' conversion script
    model = tiny_shield(yes_no)
    model.save_pretrained(hf)
    (hf / "chat_template.jinja").write_text(TEMPLATE)
    convert(hf, folder / "mlx")
    images = [picture(folder / "a.png", 40, 30, 1), picture(folder / "b.png", 23, 61, 2)]
    return folder, model, processor, images


def reference(built, policies=None, custom_policies=None, model=None):
    """transformers' probabilities and logits [images × policies, 2]."""
    _, hf_model, processor, paths = built
    torch = reference_torch()
    images = [Image.open(path).convert("RGB") for path in paths]
    given = {k: v for k, v in (("policies", policies), ("custom_policies", custom_policies)) if v is not None}
    inputs = processor(images=images, return_tensors="pt", **given)
    with torch.no_grad():
        out = (model or hf_model)(**inputs)
    return out.probabilities.float().numpy(), out.logits.float().numpy()


def ours(scores) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([[s.yes_probability, s.no_probability] for s in scores]),
            np.array([[s.yes_logit, s.no_logit] for s in scores]))


@pytest.mark.parametrize("policies, custom", [(None, None), (["violence", "cats"], CUSTOM), (None, CUSTOM)])
def test_scores_match_transformers(built, policies, custom):
    folder, _, _, paths = built
    model, processor = mlx_gemma3.load(folder / "mlx")
    scores = shield.classify(model, processor, paths, policies, custom)
    names = policies or list({**shield.DEFAULT_POLICIES, **(custom or {})})
    assert [(s.image, s.policy) for s in scores] == [(i, name) for i in range(2) for name in names]
    probabilities, logits = reference(built, policies, custom)
    got_probabilities, got_logits = ours(scores)
    assert np.abs(got_probabilities - probabilities).max() <= 1e-4
    assert np.abs(got_logits - logits).max() <= 1e-4
