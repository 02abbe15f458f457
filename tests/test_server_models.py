"""Several models in one server process: each request's `model` picks one, models load on first use and the least
recently used leave beyond a count or a byte budget, an unknown name is a 404 in each endpoint's shape."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import anthropic
import openai
import pytest
from server_process import ServerProcess

import mlx_gemma3

pytestmark = pytest.mark.slow
SAMPLED = {"temperature": 1.0, "seed": 5}
ASK = [{"role": "user", "content": "Tell me about rivers."}]


@pytest.fixture(scope="module")
def folders(lively_chat_model, lively_image_model) -> dict[str, Path]:
    return {"text": lively_chat_model, "vision": lively_image_model}


def serve(folders: dict[str, Path], *flags: str) -> ServerProcess:
    named = [arg for name, folder in folders.items() for arg in ("--model", str(folder), "--served-model-name", name)]
    return ServerProcess(*named, *flags)


def chat(served: ServerProcess, model: str, max_tokens: int = 8) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=120)
    return client.chat.completions.create(model=model, messages=ASK, max_tokens=max_tokens, **SAMPLED)


def listed(served: ServerProcess, field: str = "loaded") -> dict[str, bool]:
    """Each listed model's `field` (/v1/models)."""
    with urllib.request.urlopen(served.url + "/v1/models") as response:
        return {model["id"]: model[field] for model in json.load(response)["data"]}


def loaded(served: ServerProcess) -> dict[str, bool]:
    return listed(served, "loaded")


def library_reply(folder: Path) -> str:
    model, processor = mlx_gemma3.load(folder)
    return mlx_gemma3.generate(model, processor, ASK, max_tokens=8, temp=SAMPLED["temperature"], seed=SAMPLED["seed"])


def test_two_models_answer_by_name_and_unknown_names_are_404s(folders):
    served = serve(folders)
    try:
        assert loaded(served) == {"text": True, "vision": False}  # the first loads at start, the other when asked
        assert listed(served, "vision") == {"text": False, "vision": True}  # read from its config before it loads
        for name, folder in folders.items():
            reply = chat(served, name)
            assert reply.model == name and reply.choices[0].message.content == library_reply(folder)
        assert loaded(served) == {"text": True, "vision": True}
        gpt = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError) as raised:
            gpt.chat.completions.create(model="other", messages=ASK, max_tokens=2)
        assert raised.value.code == "model_not_found" and "text, vision" in raised.value.message
        with pytest.raises(openai.NotFoundError):
            gpt.responses.create(model="other", input="Hi", max_output_tokens=2)
        claude = anthropic.Anthropic(base_url=served.url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.NotFoundError) as raised:
            claude.messages.create(model="other", messages=ASK, max_tokens=2)
        assert raised.value.body["error"]["type"] == "not_found_error"
    finally:
        log = served.stop()
    assert "loaded chat model vision" in log and "unloaded" not in log


@pytest.mark.parametrize("bound", ["count", "bytes"])
def test_the_least_recently_used_model_leaves_under_a_bound(folders, bound):
    weights = max(sum(f.stat().st_size for f in folder.glob("*.safetensors")) for folder in folders.values())
    flags = ["--max-loaded-models", "1"] if bound == "count" else ["--max-loaded-models", "0"]
    flags += ["--max-model-bytes", str(weights + weights // 2)] if bound == "bytes" else []
    served = serve(folders, *flags)
    try:
        first = chat(served, "text").choices[0].message.content
        chat(served, "vision")
        assert loaded(served) == {"text": False, "vision": True}
        assert chat(served, "text").choices[0].message.content == first  # loaded again, the same model
        assert loaded(served) == {"text": True, "vision": False}
    finally:
        log = served.stop()
    assert log.count("unloaded chat model") == 2


def test_a_folder_of_model_folders_serves_each_by_its_name(folders, tmp_path):
    for name, folder in folders.items():
        (tmp_path / f"{name}-model").symlink_to(folder, target_is_directory=True)
    served = ServerProcess("--model", str(tmp_path))
    try:
        assert loaded(served) == {"text-model": True, "vision-model": False}
        assert chat(served, "vision-model").choices[0].message.content == library_reply(folders["vision"])
    finally:
        served.stop()


def test_a_draft_model_is_registered_but_not_listed(folders):
    served = ServerProcess("--model", str(folders["text"]), "--draft-model", str(folders["text"]))
    try:
        assert loaded(served) == {folders["text"].name: True}
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="any", messages=ASK, max_tokens=8)
        model, processor = mlx_gemma3.load(folders["text"])
        assert reply.choices[0].message.content == mlx_gemma3.generate(model, processor, ASK, max_tokens=8)
    finally:
        served.stop()
