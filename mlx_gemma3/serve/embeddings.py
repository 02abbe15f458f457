"""POST /v1/embeddings (OpenAI's embeddings API) answered by an EmbeddingGemma model: request checks and the reply.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from ..errors import Gemma3Error
from ..generation.encode import EmbeddingModel, checked_dimensions, embed_all
from ..processing.embedding_tasks import task_prompt, titled
from .requests import RequestError, check_fields

EMBEDDINGS_PATH = "/v1/embeddings"
# OpenAI's fields, and EmbeddingGemma's task prompt and document title (extensions: the openai client sends them
# through extra_body).
EMBEDDING_FIELDS = {"input", "model", "dimensions", "encoding_format", "user", "task", "title"}
ENCODINGS = ("float", "base64")
MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request


@dataclass(frozen=True)
class EmbeddingRequest:
    """A checked embeddings request: texts (or token-id lists), and how to encode and return them."""

    inputs: list
    dimensions: int | None = None
    encoding_format: str = "float"
    task: str | None = None
    title: str | None = None


def parse_embeddings(body: dict, model: EmbeddingModel) -> EmbeddingRequest:
    """A checked request for `model`; its inputs are checked as they are tokenized."""
    check_fields(body, EMBEDDING_FIELDS)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise RequestError(f"'encoding_format' must be one of {', '.join(ENCODINGS)}", param="encoding_format")
    task, title = body.get("task"), body.get("title")
    for key, check in (
        ("dimensions", lambda: checked_dimensions(body.get("dimensions"), model.dimensions)),
        ("task", lambda: task_prompt(model.model.sentence, task)),
        ("title", lambda: titled(task_prompt(model.model.sentence, task), title)),
    ):
        try:
            check()
        except Gemma3Error as e:
            raise RequestError(str(e), param=key) from None
    return EmbeddingRequest(inputs(body.get("input")), body.get("dimensions"), encoding, task, title)


def inputs(value) -> list:
    """OpenAI's `input`: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return [value]
    shape = "'input' must be a string, a list of strings, a list of token ids or a list of token-id lists"
    if not isinstance(value, list) or not value:
        raise RequestError(shape, param="input")
    if len(value) > MAX_INPUTS:
        raise RequestError(f"'input' holds {len(value)} items; at most {MAX_INPUTS} a request", param="input")
    if not all(isinstance(item, (str, list)) for item in value):
        raise RequestError(shape, param="input")
    return value


def embeddings_body(model: EmbeddingModel, request: EmbeddingRequest, model_id: str) -> dict:
    """The reply: one embedding per input, in order, and the tokens the inputs took."""
    try:
        result = embed_all(model, request.inputs, request.task, request.dimensions, request.title)
    except Gemma3Error as e:
        raise RequestError(str(e), param="input") from None
    data = [
        {"object": "embedding", "index": i, "embedding": encoded(vector, request.encoding_format)}
        for i, vector in enumerate(result.vectors)
    ]
    usage = {"prompt_tokens": result.tokens, "total_tokens": result.tokens}
    return {"object": "list", "data": data, "model": model_id, "usage": usage}


def encoded(vector: np.ndarray, encoding: str):
    """A vector as JSON numbers, or as base64 of its little-endian float32 bytes (what the openai client decodes)."""
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()


def embeddings(exchange) -> None:
    """POST /v1/embeddings: the vectors, computed on the embedding model's worker thread (one call)."""
    body = exchange.read_json()
    served = exchange.served_model(body.get("model"), "embedding")
    request = parse_embeddings(body, served.model)
    exchange.send_json(200, exchange.on_worker(served, lambda: embeddings_body(served.model, request, served.name)))
