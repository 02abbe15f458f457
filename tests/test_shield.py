"""ShieldGemma 2: a tiny random classifier built with transformers, converted, scored against transformers."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    FIXTURES,
    SPM_IMAGE_TOKENS,
    TINY_TEXT,
    TINY_VISION,
    convert,
    gemma3_processor,
    randomize,
    reference_torch,
)
from PIL import Image

import mlx_gemma3
from mlx_gemma3 import shield

pytestmark = pytest.mark.slow  # each test needs the converted tiny classifier (about 10 s to build once)
TOKENS_PER_IMAGE = 4
TEMPLATE = (FIXTURES / "shieldgemma2_chat_template.jinja").read_text()
CUSTOM = {
    "cats": "No Cats: The image shall not contain a cat.",
    "dangerous": "No Knives: The image shall not show a knife.",
}


def tiny_shield(yes_no: list[int]):
    from transformers import ShieldGemma2Config, ShieldGemma2ForImageClassification

    config = ShieldGemma2Config(
        text_config=TINY_TEXT,
        vision_config=TINY_VISION,
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        **SPM_IMAGE_TOKENS,
        yes_token_index=yes_no[0],
        no_token_index=yes_no[1],
    )
    reference_torch().manual_seed(11)
    return randomize(ShieldGemma2ForImageClassification(config), seed=11)


def picture(path, width: int, height: int, seed: int):
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@dataclass
class Built:
    """The tiny classifier: folder/hf (transformers' save) converted to folder/mlx, with two image files."""

    folder: Path
    model: object  # ShieldGemma2ForImageClassification
    processor: object  # ShieldGemma2Processor
    paths: list[Path]
    references: dict = field(default_factory=dict)  # reference() results by their arguments, computed once


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from spm_fixture import train_tokenizer
    from transformers import ShieldGemma2Processor

    folder = tmp_path_factory.mktemp("shield")
    hf = folder / "hf"
    hf.mkdir()
    train_tokenizer(hf)
    base = gemma3_processor(hf, TINY_VISION["image_size"], TOKENS_PER_IMAGE)
    processor = ShieldGemma2Processor(
        base.image_processor, base.tokenizer, chat_template=TEMPLATE, image_seq_length=TOKENS_PER_IMAGE
    )
    yes_no = [ids[1] for ids in base.tokenizer(["Yes", "No"])["input_ids"]]  # as transformers' conversion script
    model = tiny_shield(yes_no)
    model.save_pretrained(hf)
    (hf / "chat_template.jinja").write_text(TEMPLATE)
    convert(hf, folder / "mlx")
    images = [picture(folder / "a.png", 40, 30, 1), picture(folder / "b.png", 23, 61, 2)]
    return Built(folder, model, processor, images)


def reference(built: Built, policies=None, custom_policies=None, model=None):
    """transformers' probabilities and logits [images × policies, 2] (`model`: another transformers model)."""
    key = (tuple(policies or ()), tuple((custom_policies or {}).items()), id(model))
    if key not in built.references:
        torch = reference_torch()
        images = [Image.open(path).convert("RGB") for path in built.paths]
        given = {k: v for k, v in (("policies", policies), ("custom_policies", custom_policies)) if v is not None}
        inputs = built.processor(images=images, return_tensors="pt", **given)
        with torch.no_grad():
            out = (model or built.model)(**inputs)
        built.references[key] = out.probabilities.float().numpy(), out.logits.float().numpy()
    return built.references[key]


def ours(scores) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([[s.yes_probability, s.no_probability] for s in scores]),
        np.array([[s.yes_logit, s.no_logit] for s in scores]),
    )


@pytest.mark.parametrize("custom, images_per_batch", [(None, 4), (CUSTOM, 1)])
def test_scores_match_transformers(built, custom, images_per_batch):
    """2 images × the built-in policies; then with a custom policy added and a built-in one overridden, one image
    per batch."""
    folder, paths = built.folder, built.paths
    model, processor = mlx_gemma3.load(folder / "mlx")
    scores = shield.classify(model, processor, paths, custom_policies=custom, images_per_batch=images_per_batch)
    names = list({**shield.DEFAULT_POLICIES, **(custom or {})})
    assert [(s.image, s.policy) for s in scores] == [(i, name) for i in range(2) for name in names]
    probabilities, logits = reference(built, None, custom)
    got_probabilities, got_logits = ours(scores)
    assert np.abs(got_probabilities - probabilities).max() <= 1e-4
    assert np.abs(got_logits - logits).max() <= 1e-4


@pytest.mark.parametrize("template", [True, False])
def test_prompt_ids_equal_the_processors(built, template):
    """Every built-in policy and a custom one: the folder's chat template, and our text of it when a folder has none."""
    from dataclasses import replace

    from mlx_gemma3.processing.shield_prompt import shield_prompt_ids

    folder, hf_processor, paths = built.folder, built.processor, built.paths
    processor = mlx_gemma3.load(folder / "mlx")[1]
    processor = processor if template else replace(processor, chat_template=None)
    image = Image.open(paths[0]).convert("RGB")
    for name, text in {**shield.DEFAULT_POLICIES, "cats": CUSTOM["cats"]}.items():
        inputs = hf_processor(images=[image], policies=[name], custom_policies=CUSTOM if name == "cats" else {})
        expected = [int(i) for i, keep in zip(inputs["input_ids"][0], inputs["attention_mask"][0]) if keep]
        assert shield_prompt_ids(processor, text) == expected, name


def test_hub_and_wrapped_mlx_layouts_load_the_same(built, tmp_path):
    """The Hub's keys (`model.language_model.model.…`, `model.vision_tower.vision_model.…`, a stored head) convert
    to the same folder; an MLX folder that kept the wrapper's `model.` prefix loads the same weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    folder = built.folder
    tensors = mx.load(str(folder / "hf" / "model.safetensors"))
    hub = {}
    for key, value in tensors.items():
        key = key.replace("model.model.language_model.", "model.language_model.")
        key = key.replace("model.model.vision_tower.", "model.vision_tower.vision_model.")
        hub[key.replace("model.model.multi_modal_projector.", "model.multi_modal_projector.")] = value
    hub["model.language_model.lm_head.weight"] = hub["model.language_model.model.embed_tokens.weight"]
    shutil.copytree(folder / "hf", tmp_path / "hub")
    mx.save_safetensors(str(tmp_path / "hub" / "model.safetensors"), hub)
    convert(tmp_path / "hub", tmp_path / "hub-mlx")
    expected = mx.load(str(folder / "mlx" / "model.safetensors"))
    assert mx.load(str(tmp_path / "hub-mlx" / "model.safetensors")).keys() == expected.keys()

    shutil.copytree(folder / "mlx", tmp_path / "wrapped")
    mx.save_safetensors(str(tmp_path / "wrapped" / "model.safetensors"), {f"model.{k}": v for k, v in expected.items()})
    loaded = [
        dict(tree_flatten(mlx_gemma3.load(path, lazy_vision=False)[0].parameters()))
        for path in (folder / "mlx", tmp_path / "wrapped", tmp_path / "hub-mlx")
    ]
    for other in loaded[1:]:
        assert other.keys() == loaded[0].keys()
        assert all(mx.array_equal(other[key], loaded[0][key]) for key in loaded[0])


def test_4bit_stores_the_reference_quantizers_tensors_and_stays_as_close_to_float(built):
    """-q (4 bits, group 64) stores what MLX's quantizer makes of transformers' weights (mlx-lm cannot load a
    ShieldGemma 2: quantized_by_mlx applies its rule), scores like transformers on those weights, and lies no
    farther from the float classifier than that reference does."""
    from test_quantize import assert_stores_the_references_tensors, dequantized_reference, quantized_by_mlx

    folder, hf_model, paths = built.folder, built.model, built.paths
    q4 = convert(folder / "hf", folder / "q4", "-q")
    config = json.loads((q4 / "config.json").read_text())
    assert config["model_type"] == "shieldgemma2" and config["quantization"]["bits"] == 4
    tensors = quantized_by_mlx(
        hf_model, folder / "hf", 64, lambda path: 4, lambda name: "position_embedding" not in name
    )
    assert_stores_the_references_tensors(q4, tensors)
    model, processor = mlx_gemma3.load(q4)
    assert model.language_model.model.layers[0].mlp.up_proj.bits == 4
    quantized = dequantized_reference(hf_model, folder / "hf", tensors, lambda path: (64, 4))
    probabilities, logits = reference(built, model=quantized)
    got_probabilities, got_logits = ours(shield.classify(model, processor, paths))
    assert np.abs(got_probabilities - probabilities).max() <= 1e-4
    assert np.abs(got_logits - logits).max() <= 1e-4
    float_probabilities, _ = reference(built)
    theirs, mine = (np.abs(p - float_probabilities).max() for p in (probabilities, got_probabilities))
    print(f"4-bit: max |Δ probability| to the float classifier: reference {theirs:.4f}, ours {mine:.4f}")
    assert 0 < mine <= theirs + 1e-4


def test_classify_refuses_what_it_cannot_score(built, hf_text, tmp_path):
    folder, paths = built.folder, built.paths
    model, processor = mlx_gemma3.load(folder / "mlx")
    with pytest.raises(mlx_gemma3.Gemma3Error, match="unknown policy 'nudity'.*dangerous, sexual, violence"):
        shield.classify(model, processor, paths, ["nudity"])
    with pytest.raises(mlx_gemma3.Gemma3Error, match="no image to classify"):
        shield.classify(model, processor, [])
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(mlx_gemma3.Gemma3Error, match="notes.txt is not an image"):
        shield.classify(model, processor, [paths[0], tmp_path / "notes.txt"])
    text_model, text_processor = mlx_gemma3.load(convert(hf_text[0], tmp_path / "text"))
    with pytest.raises(mlx_gemma3.Gemma3Error, match="not a ShieldGemma 2 .*'gemma3_text'"):
        shield.classify(text_model, text_processor, paths)


def test_cli_table_and_threshold_exit_codes(built, capsys):
    """A table and exit 0 below the threshold; JSON (transformers' numbers) and exit 1, from a real process, once one
    probability reaches it."""
    from conftest import run_cli

    from mlx_gemma3.shield import main

    folder, paths = built.folder, built.paths
    highest = reference(built)[0][:, 0].max()
    args = ["--model", str(folder / "mlx"), "--image", str(paths[0]), "--image", str(paths[1])]
    assert main([*args, "--threshold", f"{highest + 2e-4:.6f}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "policy", "P(violates)", "verdict"] and len(lines) == 7
    assert lines[1].split()[:2] == [str(paths[0]), "dangerous"] and lines[6].split()[:2] == [str(paths[1]), "violence"]
    assert all(line.endswith("ok") for line in lines[1:])

    result = run_cli("mlx_gemma3.shield", *args, "--json", "--threshold", f"{highest - 2e-4:.6f}")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    probabilities = [[r["yes_probability"], r["no_probability"]] for r in report["results"]]
    assert np.abs(np.array(probabilities) - reference(built)[0]).max() <= 1e-4
    assert report["flagged"] and sum(r["violates"] for r in report["results"]) == 1


def test_cli_bad_image_and_unknown_policy_are_one_line(built, tmp_path, capsys):
    from mlx_gemma3.shield import main

    folder, paths = built.folder, built.paths
    (tmp_path / "notes.txt").write_text("not an image")
    model = ["--model", str(folder / "mlx")]
    cases = [
        (["--image", str(paths[0]), "--image", str(tmp_path / "notes.txt")], 1, "notes.txt is not an image"),
        (["--image", str(paths[0]), "--policy", "nudity"], 1, "unknown policy 'nudity'"),
        (["--image", str(paths[0]), "--custom-policy", "cats"], 2, "--custom-policy must be NAME=DESCRIPTION"),
        (["--image", str(paths[0]), "--threshold", "1.5"], 2, "--threshold must be a probability from 0 to 1"),
    ]
    for args, code, message in cases:
        try:
            returned = main(model + args)
        except SystemExit as e:  # argparse's own exit
            returned = e.code
        err = capsys.readouterr().err
        assert returned == code and err.count("\n") == 1 and message in err, (args, err)


def test_cli_custom_policy_scores_match_transformers(built, capsys):
    from mlx_gemma3.shield import main

    folder, paths = built.folder, built.paths
    args = [
        "--model",
        str(folder / "mlx"),
        "--image",
        str(paths[1]),
        "--policy",
        "cats",
        "--policy",
        "dangerous",
        "--custom-policy",
        f"cats={CUSTOM['cats']}",
        "--json",
        "--threshold",
        "1",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    expected = reference(built, ["cats", "dangerous"], {"cats": CUSTOM["cats"]})[1][2:]  # the second image's rows
    logits = [[r["yes_logit"], r["no_logit"]] for r in report["results"]]
    assert [r["policy"] for r in report["results"]] == ["cats", "dangerous"]
    assert np.abs(np.array(logits) - expected).max() <= 1e-4


def start_server(folder):
    import os
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_gemma3.server", "--model", str(folder), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = process.stderr.readline()
    assert line.startswith("serving"), line
    return process, int(line.rsplit(":", 1)[1].split("/")[0])


def data_url(path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_moderation_endpoint_scores_two_images(built):
    import openai

    folder, paths = built.folder, built.paths
    process, port = start_server(folder / "mlx")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        items = [{"type": "image_url", "image_url": {"url": data_url(path)}} for path in paths]
        reply = client.moderations.create(model="shield", input=items).to_dict()
        custom = client.moderations.create(
            model="shield",
            input=items[1:],
            extra_body={"policies": ["cats"], "custom_policies": {"cats": CUSTOM["cats"]}},
        ).to_dict()
        with pytest.raises(openai.BadRequestError, match=r"input\[0\]: only 'image_url' items"):
            client.moderations.create(model="shield", input=[{"type": "text", "text": "hello"}])
        with pytest.raises(openai.BadRequestError, match="unknown policy 'nudity'"):
            client.moderations.create(model="shield", input=items, extra_body={"policies": ["nudity"]})
    finally:
        process.terminate()
        process.communicate(timeout=30)
    expected = reference(built)[0][:, 0].reshape(2, 3)
    assert len(reply["results"]) == 2
    for result, row in zip(reply["results"], expected):
        names = list(shield.DEFAULT_POLICIES)  # the client's model orders them its own way: compare by name
        scores = result["category_scores"]
        assert sorted(scores) == sorted(names)
        assert np.abs(np.array([scores[name] for name in names]) - row).max() <= 1e-4
        assert result["categories"] == {name: bool(p >= 0.5) for name, p in zip(names, row)}
        assert result["flagged"] == bool((row >= 0.5).any())
    cats = reference(built, ["cats"], {"cats": CUSTOM["cats"]})[0][1, 0]
    assert abs(custom["results"][0]["category_scores"]["cats"] - cats) <= 1e-4


def test_moderation_on_a_text_model_is_a_clear_400(tiny_chat_model):
    import openai

    process, port = start_server(tiny_chat_model[0])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
        with pytest.raises(openai.BadRequestError, match="/v1/moderations needs a ShieldGemma 2 model"):
            client.moderations.create(model="tiny", input=image)
        assert client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        ).choices  # the server still serves chats
    finally:
        process.terminate()
        process.communicate(timeout=30)
