"""Gemma 3's SentencePiece tokenizer.model, rebuilt from a GGUF file's llama.cpp tokenizer metadata.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from sentencepiece import sentencepiece_model_pb2

from mlx_gemma3.errors import Gemma3Error
from mlx_gemma3.model.config import short_repr

from .gguf_file import GGUFFile

_PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece
# llama.cpp's token types are SentencePiece's: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_TYPES = frozenset(range(1, 7))
# (trainer_spec's stem, the stem of tokenizer.ggml.*_token_id)
_SPECIAL = (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
_ARRAYS = (("tokens", str), ("scores", float), ("token_type", int))


def sentencepiece_model(reader: GGUFFile, where: str) -> bytes:
    """A serialized SentencePiece ModelProto equal to the tokenizer.model the GGUF was made from."""
    kind = _value(reader, "tokenizer.ggml.model", where, str)
    if kind != "llama":
        raise Gemma3Error(f"{where}: tokenizer.ggml.model is {short_repr(kind)}; Gemma 3 needs 'llama' (SentencePiece)")
    tokens, scores, types = (_array(reader, f"tokenizer.ggml.{key}", where, kind) for key, kind in _ARRAYS)
    if not len(tokens) == len(scores) == len(types):
        raise Gemma3Error(f"{where}: tokenizer.ggml.tokens, .scores and .token_type differ in length")
    proto = sentencepiece_model_pb2.ModelProto()
    _add_pieces(proto, [_respell(t) for t in tokens], scores, types, where)
    _set_specs(proto, _special_ids(reader, types, where))
    return _loadable(proto.SerializeToString(), where)


def _loadable(model: bytes, where: str) -> bytes:
    """The serialized model, once SentencePiece has accepted it (it checks what the metadata cannot say)."""
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor().LoadFromSerializedProto(model)
    except (RuntimeError, OSError) as e:
        raise Gemma3Error(
            f"{where}: SentencePiece refuses the tokenizer in its metadata ({e}) — the file is damaged"
        ) from None
    return model


def chat_template(reader: GGUFFile) -> str | None:
    """tokenizer.chat_template, which some GGUF files carry (the 270M's does not)."""
    template = reader.metadata.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise Gemma3Error(f"{reader.path}: tokenizer.chat_template is not a string — the file is damaged")
    return template


def _value(reader: GGUFFile, key: str, where: str, kind: type):
    value = reader.metadata.get(key)
    if value is None:
        raise Gemma3Error(f"{where}: no {key} in the GGUF metadata, so its tokenizer cannot be rebuilt")
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Gemma3Error(f"{where}: {key} is a {type(value).__name__}, not a {kind.__name__} — the file is damaged")
    return value


def _array(reader: GGUFFile, key: str, where: str, kind: type) -> list:
    """A metadata array whose every item is a `kind` (float: any number)."""
    items = _value(reader, key, where, list)
    accepted = (int, float) if kind is float else kind
    wrong = next((i for i, item in enumerate(items) if not isinstance(item, accepted) or isinstance(item, bool)), None)
    if wrong is not None:
        raise Gemma3Error(
            f"{where}: {key}[{wrong}] is {short_repr(items[wrong])}, not a {kind.__name__} — the file is damaged"
        )
    return items


def _respell(token: str) -> str:
    """llama.cpp writes ▁ as a space in user-defined pieces ("▁▁" → "  "); SentencePiece's never hold one."""
    return token.replace(" ", "\u2581")


def _add_pieces(proto, tokens: list[str], scores: list[float], types: list[int], where: str) -> None:
    seen = set()
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind not in _TYPES:
            raise Gemma3Error(f"{where}: tokenizer.ggml.token_type of token {i} is {kind}, not one of 1-6")
        if token in seen:
            raise Gemma3Error(f"{where}: tokenizer.ggml.tokens holds {token!r} twice (again at {i})")
        seen.add(token)
        proto.pieces.add(piece=token, score=score, type=kind)


def _special_ids(reader: GGUFFile, types: list[int], where: str) -> dict[str, int]:
    """unk/bos/eos/pad ids from their keys (-1 if absent); unk falls back to the piece typed unknown."""
    ids = {}
    for stem, key in _SPECIAL:
        value = reader.metadata.get(f"tokenizer.ggml.{key}_token_id", -1)
        if not isinstance(value, int) or isinstance(value, bool) or value < -1:
            raise Gemma3Error(
                f"{where}: tokenizer.ggml.{key}_token_id is {short_repr(value)}, not a token id — the file is damaged"
            )
        ids[stem] = value
    if ids["unk"] < 0:
        ids["unk"] = next((i for i, kind in enumerate(types) if kind == _PIECE.UNKNOWN), -1)
    if ids["unk"] < 0:
        raise Gemma3Error(f"{where}: no tokenizer.ggml.unknown_token_id nor unknown token; SentencePiece needs one")
    for (_, key), i in zip(_SPECIAL, ids.values()):
        if i >= len(types):
            raise Gemma3Error(f"{where}: tokenizer.ggml.{key}_token_id {i} is past the {len(types)} tokens")
    return ids


def _set_specs(proto, ids: dict[str, int]) -> None:
    """Gemma's settings: BPE, byte fallback, digits split, text kept exactly as written."""
    trainer = proto.trainer_spec
    trainer.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(proto.pieces)
    trainer.byte_fallback = trainer.split_digits = trainer.allow_whitespace_only_pieces = True
    for stem, i in ids.items():
        setattr(trainer, f"{stem}_id", i)
        if i >= 0:
            setattr(trainer, f"{stem}_piece", proto.pieces[i].piece)
    # llama.cpp marks <unk> control (Gemma's config calls it special); SentencePiece needs exactly one unknown piece.
    for i, piece in enumerate(proto.pieces):
        if piece.type == _PIECE.UNKNOWN and i != ids["unk"]:
            piece.type = _PIECE.CONTROL
    proto.pieces[ids["unk"]].type = _PIECE.UNKNOWN
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
