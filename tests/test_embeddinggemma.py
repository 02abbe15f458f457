"""EmbeddingGemma: a tiny random model built with transformers and sentence-transformers (bidirectional attention, a
window shorter than the texts, mean pooling, two dense layers, normalisation, task prompts), converted with our
converter; every vector, at every Matryoshka width, against SentenceTransformer.encode — through the library, the
command line and a real server process asked by the openai client."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_TEXT, convert, randomize, reference_torch, run_cli

import mlx_gemma3
from mlx_gemma3.errors import Gemma3Error
from mlx_gemma3.model.weights import read_weights

# EmbeddingGemma's own prompts (config_sentence_transformers.json of google/embeddinggemma-300m).
PROMPTS = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "BitextMining": "task: search result | query: ",
    "Clustering": "task: clustering | query: ",
    "Classification": "task: classification | query: ",
    "InstructionRetrieval": "task: code retrieval | query: ",
    "MultilabelClassification": "task: classification | query: ",
    "PairClassification": "task: sentence similarity | query: ",
    "Reranking": "task: search result | query: ",
    "Retrieval": "task: search result | query: ",
    "Retrieval-query": "task: search result | query: ",
    "Retrieval-document": "title: none | text: ",
    "STS": "task: sentence similarity | query: ",
    "Summarization": "task: summarization | query: ",
}
HIDDEN, WIDE = TINY_TEXT["hidden_size"], 4 * TINY_TEXT["hidden_size"]  # 2_Dense widens 4×, 3_Dense narrows back
WINDOW = 8  # on disk; transformers lets a token see 4 on each side on sliding layers, far fewer than the texts hold
MAX_SEQ_LENGTH = 40  # the longest text below is cut to this, <bos> and <eos> included
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. In the beginning there was text, and the text was tokenized.",
    "a",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 and 3.14159, with some words repeated: the the the and and.",
    "안녕하세요 세계. 한국어 문장입니다.",
    "for i in range(10):\n    print(i * 2)",
]
WIDTHS = (HIDDEN, 32, 16, 8)  # the tiny model's Matryoshka widths (EmbeddingGemma's: 768, 512, 256, 128)
TOLERANCE = 1e-4
pytestmark = pytest.mark.slow


def sentence_folder(folder: Path, window: int = WINDOW) -> Path:
    """A saved SentenceTransformer shaped like EmbeddingGemma: Gemma3TextModel (bidirectional), mean pooling, Dense
    64→256 and 256→64 without bias or activation, Normalize; the tokenizer adds <bos> and <eos>."""
    torch = reference_torch()
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from spm_fixture import reference, train_tokenizer
    from transformers import Gemma3TextConfig, Gemma3TextModel

    tower = folder / "tower"
    config = Gemma3TextConfig(**{**TINY_TEXT, "sliding_window": window, "use_bidirectional_attention": True})
    torch.manual_seed(3)
    randomize(Gemma3TextModel(config), seed=3).save_pretrained(tower)
    train_tokenizer(tower)
    reference(tower)
    settings = json.loads((tower / "tokenizer_config.json").read_text())
    (tower / "tokenizer_config.json").write_text(json.dumps({**settings, "add_eos_token": True}))
    identity = torch.nn.Identity()
    dense = [Dense(HIDDEN, WIDE, False, identity), Dense(WIDE, HIDDEN, False, identity)]
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in dense:
            layer.linear.weight.copy_(torch.randn(layer.linear.weight.shape, generator=gen) / layer.in_features**0.5)
    modules = [Transformer(str(tower), max_seq_length=MAX_SEQ_LENGTH), Pooling(HIDDEN, pooling_mode="mean")]
    model = SentenceTransformer(modules=[*modules, *dense, Normalize()], prompts=PROMPTS, device="cpu")
    model.save(str(folder / "st"))
    shutil.copyfile(tower / "tokenizer.model", folder / "st" / "tokenizer.model")  # as EmbeddingGemma's repo holds it
    return folder / "st"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """(sentence-transformers folder, its SentenceTransformer, our float folder, 4-bit folder, 8-bit folder)."""
    from sentence_transformers import SentenceTransformer

    folder = tmp_path_factory.mktemp("embeddinggemma")
    st_folder = sentence_folder(folder)
    converted = [
        convert(st_folder, folder / name, *flags)
        for name, flags in (("mlx", ()), ("q4", ("-q", "--q-bits", "4")), ("q8", ("-q", "--q-bits", "8")))
    ]
    return st_folder, SentenceTransformer(str(st_folder), device="cpu"), *converted


def reference_vectors(st, texts, task=None, width=None, prompt=None) -> np.ndarray:
    options = {"prompt_name": task} if task else {"prompt": prompt} if prompt is not None else {}
    return st.encode(texts, truncate_dim=width, normalize_embeddings=width is not None, **options)


@pytest.mark.parametrize("task", [None, "query", "document", "Classification", "Clustering", "STS"])
def test_every_vector_at_every_width_matches_sentence_transformers(family, task):
    st_folder, st, folder, *_ = family
    model = mlx_gemma3.load_embedding(folder)
    assert sorted(model.tasks) == sorted(PROMPTS)
    for width in WIDTHS:
        expected = reference_vectors(st, TEXTS, task, None if width == HIDDEN else width)
        ours = mlx_gemma3.embed(model, TEXTS, task=task, dimensions=None if width == HIDDEN else width)
        assert ours.shape == (len(TEXTS), width)
        np.testing.assert_allclose(ours, expected, atol=TOLERANCE, rtol=0)


def test_the_texts_exceed_the_window_and_the_length_limit(family):
    """The comparison above would pass without the window or the cut if the texts were short: they are not."""
    st_folder, st, *_ = family
    lengths = st.tokenize(TEXTS)["attention_mask"].sum(1).tolist()
    assert max(lengths) == MAX_SEQ_LENGTH < len(st.tokenizer(TEXTS[1]).input_ids)
    assert sum(length > 2 * WINDOW for length in lengths) >= 3 and min(lengths) < WINDOW // 2


def test_the_window_changes_the_vectors(family, tmp_path):
    """Without its band (a window wider than the texts) the same weights give other vectors: the band matters."""
    from sentence_transformers import SentenceTransformer

    st_folder = family[0]
    wide = tmp_path / "wide"
    shutil.copytree(st_folder, wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "sliding_window": 4 * MAX_SEQ_LENGTH}))
    banded, unbanded = family[1].encode(TEXTS), SentenceTransformer(str(wide), device="cpu").encode(TEXTS)
    assert np.abs(banded - unbanded).max() > 100 * TOLERANCE


def test_document_titles_and_token_arrays(family):
    st_folder, st, folder, *_ = family
    model = mlx_gemma3.load_embedding(folder)
    titled = mlx_gemma3.embed(model, TEXTS[:2], task="document", title=["Foxes", None])
    np.testing.assert_allclose(
        titled[0], reference_vectors(st, TEXTS[:1], prompt="title: Foxes | text: ")[0], atol=TOLERANCE
    )
    np.testing.assert_allclose(titled[1], reference_vectors(st, TEXTS[1:2], task="document")[0], atol=TOLERANCE)
    ids = st.tokenizer(TEXTS[0], add_special_tokens=False).input_ids
    np.testing.assert_allclose(
        mlx_gemma3.embed(model, [ids], task="query"), reference_vectors(st, TEXTS[:1], "query"), atol=TOLERANCE
    )
    single = mlx_gemma3.embed(model, TEXTS[3], task="sts", dimensions=16)  # one string: one vector; names any case
    np.testing.assert_allclose(single, reference_vectors(st, TEXTS[3:4], "STS", 16)[0], atol=TOLERANCE)


def dequantized_sentence_model(st_folder: Path, quantized: Path, tmp_path: Path):
    """The sentence-transformers model whose weights are our stored quantized weights, dequantized."""
    from safetensors.torch import save_file
    from sentence_transformers import SentenceTransformer

    torch = reference_torch()
    stored = read_weights(quantized)
    spec = json.loads((quantized / "config.json").read_text())["quantization"]
    values = {}
    for key, value in stored.items():
        if key.endswith((".scales", ".biases")):
            continue
        path = key.removesuffix(".weight")
        if f"{path}.scales" in stored:
            value = mx.dequantize(
                value, stored[f"{path}.scales"], stored[f"{path}.biases"], spec["group_size"], spec["bits"]
            )
        values[key] = torch.tensor(np.array(value.astype(mx.float32)))
    copy = tmp_path / quantized.name
    shutil.copytree(st_folder, copy)
    save_file(
        {k.removeprefix("model."): v for k, v in values.items() if k.startswith("model.")}, copy / "model.safetensors"
    )
    for i, sub in enumerate(("2_Dense", "3_Dense")):
        save_file({"linear.weight": values[f"dense.{i}.weight"].contiguous()}, copy / sub / "model.safetensors")
    return SentenceTransformer(str(copy), device="cpu")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_folders_match_the_dequantized_reference(family, bits, tmp_path):
    st_folder, st, folder, q4, q8 = family
    quantized = q4 if bits == 4 else q8
    assert read_weights(quantized)["dense.0.scales"].size and read_weights(quantized)["model.embed_tokens.scales"].size
    reference = dequantized_sentence_model(st_folder, quantized, tmp_path)
    model = mlx_gemma3.load_embedding(quantized)
    for width in (HIDDEN, 16):
        expected = reference_vectors(reference, TEXTS, "query", None if width == HIDDEN else width)
        ours = mlx_gemma3.embed(model, TEXTS, task="query", dimensions=None if width == HIDDEN else width)
        np.testing.assert_allclose(ours, expected, atol=TOLERANCE, rtol=0)


def test_bad_input_is_one_clear_error(family):
    st_folder, _, folder, *_ = family
    model = mlx_gemma3.load_embedding(folder)
    cases = [
        (lambda: mlx_gemma3.embed(model, TEXTS, task="poetry"), "unknown task 'poetry'"),
        (lambda: mlx_gemma3.embed(model, TEXTS, task="query", title="T"), "a title goes with the document task"),
        (lambda: mlx_gemma3.embed(model, TEXTS, dimensions=0), "dimensions must be an integer from 1 to 64"),
        (lambda: mlx_gemma3.embed(model, TEXTS, dimensions=65), "dimensions must be an integer from 1 to 64"),
        (lambda: mlx_gemma3.embed(model, []), "texts must be a non-empty list"),
        (lambda: mlx_gemma3.embed(model, [[1, 10**6]]), "below the vocabulary size"),
        (lambda: mlx_gemma3.embed(model, TEXTS, title=["a"]), "1 titles for 6 texts"),
        (lambda: mlx_gemma3.embed(object(), TEXTS), "embed needs the model mlx_gemma3.load_embedding() returns"),
        (lambda: mlx_gemma3.load(folder), "is an embedding model (EmbeddingGemma"),
        (lambda: mlx_gemma3.load_embedding(st_folder), "is a sentence-transformers folder as published"),
        (lambda: mlx_gemma3.load_embedding(folder, compute_dtype=mx.float16), "float16 overflows"),
    ]
    for call, message in cases:
        with pytest.raises(Gemma3Error, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


def test_not_an_embedding_folder(tiny_chat_model):
    with pytest.raises(Gemma3Error, match="has no modules.json"):
        mlx_gemma3.load_embedding(tiny_chat_model[0])


def test_command_line(family, tmp_path):
    st_folder, st, folder, *_ = family
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS[2:4]) + "\n\n")
    result = run_cli(
        "mlx_gemma3.embed", "--model", str(folder), "-t", TEXTS[0], "--input", str(tmp_path / "texts.txt"),
        "--task", "query", "--dimensions", "32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    vectors = np.array([json.loads(line) for line in result.stdout.splitlines()])
    np.testing.assert_allclose(vectors, reference_vectors(st, [TEXTS[0], *TEXTS[2:4]], "query", 32), atol=TOLERANCE)
    for args, message in (
        ((), "nothing to embed"),
        (("-t", "x", "--task", "poetry"), "unknown task 'poetry'"),
        (("-t", "x", "--dimensions", "99"), "dimensions must be an integer from 1 to 64"),
    ):
        result = run_cli("mlx_gemma3.embed", "--model", str(folder), *args)
        assert result.returncode == 1 and result.stderr.startswith(f"error: {message}"), result.stderr
        assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def server(family, tiny_chat_model):
    """A real server process serving the tiny chat model with --embedding-model; yields its port."""
    command = [sys.executable, "-m", "mlx_gemma3.server", "--model", str(tiny_chat_model[0])]
    command += ["--embedding-model", str(family[2]), "--port", "0", "--no-web"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = process.stderr.readline()
        assert line.startswith("serving"), line + process.stderr.read()
        yield int(line.rsplit(":", 1)[1].split("/")[0])
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_openai_client_gets_the_same_vectors(family, server):
    import openai

    st = family[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="none")
    expected = reference_vectors(st, TEXTS, "query")
    as_base64 = client.embeddings.create(model="any", input=TEXTS, extra_body={"task": "query"})  # client's default
    as_floats = client.embeddings.create(
        model="any", input=TEXTS, encoding_format="float", extra_body={"task": "query"}
    )
    for reply in (as_base64, as_floats):
        assert [d.index for d in reply.data] == list(range(len(TEXTS)))
        np.testing.assert_allclose(np.array([d.embedding for d in reply.data]), expected, atol=TOLERANCE)
    tokens = int(st.tokenize([PROMPTS["query"] + t for t in TEXTS])["attention_mask"].sum())
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == tokens
    short = client.embeddings.create(model="any", input=TEXTS[0], dimensions=16, encoding_format="float")
    np.testing.assert_allclose(short.data[0].embedding, reference_vectors(st, TEXTS[:1], None, 16)[0], atol=TOLERANCE)
    raw = client.embeddings.with_raw_response.create(model="any", input=[TEXTS[0]], encoding_format="base64")
    packed = json.loads(raw.text)["data"][0]["embedding"]
    np.testing.assert_allclose(
        np.frombuffer(base64.b64decode(packed), "<f4"), reference_vectors(st, TEXTS[:1])[0], atol=TOLERANCE
    )
    ids = st.tokenizer(TEXTS[0], add_special_tokens=False).input_ids
    by_ids = client.embeddings.create(model="any", input=[ids], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, reference_vectors(st, TEXTS[:1])[0], atol=TOLERANCE)
    listed = [m.id for m in client.models.list().data]
    assert family[2].name in listed


def test_server_refuses_bad_requests(server):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="none")
    for options, param in (
        ({"input": TEXTS, "dimensions": 65}, "dimensions"),
        ({"input": TEXTS, "extra_body": {"task": "poetry"}}, "task"),
        ({"input": []}, "input"),
        ({"input": [{"text": "x"}]}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "extra_body": {"temperature": 1}}, "temperature"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(model="any", **options)
        assert caught.value.body["param"] == param


def test_server_without_an_embedding_model(tiny_chat_model):
    """The chat server alone answers /v1/embeddings with a 404 that says how to serve one."""
    import threading

    import openai

    from mlx_gemma3.serve.http import ServerState, make_server

    model, processor = mlx_gemma3.load(tiny_chat_model[0])
    httpd = make_server(ServerState(model, processor, "tiny"), "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key="none")
        with pytest.raises(openai.NotFoundError, match="--embedding-model"):
            client.embeddings.create(model="any", input="x")
    finally:
        httpd.shutdown()
        httpd.server_close()
