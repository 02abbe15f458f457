"""Gemma 3's SentencePiece tokenizer.model, rebuilt from a GGUF file's llama.cpp tokenizer metadata."""

from __future__ import annotations

import gguf
from sentencepiece import sentencepiece_model_pb2

from mlx_gemma3.errors import Gemma3Error

_PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece
# llama.cpp's token types are SentencePiece's: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_TYPES = frozenset(range(1, 7))
# (trainer_spec's stem, the stem of tokenizer.ggml.*_token_id)
_SPECIAL = (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding"))


def sentencepiece_model(reader: gguf.GGUFReader, where: str) -> bytes:
    """A serialized SentencePiece ModelProto equal to the tokenizer.model the GGUF was made from."""
    kind = _value(reader, "tokenizer.ggml.model", where)
    if kind != "llama":
        raise Gemma3Error(f"{where}: tokenizer.ggml.model is {kind!r}; Gemma 3 needs 'llama' (SentencePiece)")
    keys = ("tokens", "scores", "token_type")
    tokens, scores, types = (_value(reader, f"tokenizer.ggml.{key}", where) for key in keys)
    if not len(tokens) == len(scores) == len(types):
        raise Gemma3Error(f"{where}: tokenizer.ggml.tokens, .scores and .token_type differ in length")
    proto = sentencepiece_model_pb2.ModelProto()
    _add_pieces(proto, [_respell(t) for t in tokens], scores, types, where)
    _set_specs(proto, _special_ids(reader, types, where))
    return proto.SerializeToString()


def chat_template(reader: gguf.GGUFReader) -> str | None:
    """tokenizer.chat_template, which some GGUF files carry (the 270M's does not)."""
    field = reader.fields.get("tokenizer.chat_template")
    return None if field is None else field.contents()


def _value(reader: gguf.GGUFReader, key: str, where: str):
    field = reader.fields.get(key)
    if field is None:
        raise Gemma3Error(f"{where}: no {key} in the GGUF metadata, so its tokenizer cannot be rebuilt")
    return field.contents()


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


def _special_ids(reader: gguf.GGUFReader, types: list[int], where: str) -> dict[str, int]:
    """unk/bos/eos/pad ids from their keys (-1 if absent); unk falls back to the piece typed unknown."""
    ids = {}
    for stem, key in _SPECIAL:
        field = reader.fields.get(f"tokenizer.ggml.{key}_token_id")
        ids[stem] = -1 if field is None else int(field.contents())
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
