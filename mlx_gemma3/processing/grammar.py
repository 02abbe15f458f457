"""Grammars for constrained decoding: llguidance's view of our SentencePiece vocabulary, and JSON schemas, regular
expressions and Lark grammars turned into llguidance grammars.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import json

import llguidance

from ..errors import Gemma3Error
from .tokenizer import EOS_IDS, Tokenizer

SPECIAL_MARK = b"\xff"  # llguidance's prefix for a token that is never text (control pieces, <end_of_turn>, ...)
SPACE_MARK = "\u2581"  # SentencePiece writes a space as ▁
# Compact JSON: one space after ',' and ':', none elsewhere, so that a small model cannot pad a reply with blank lines.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's tokenizer over our vocabulary: each piece's bytes, special pieces marked, <eos> and <end_of_turn>
    as its end tokens. About a second for Gemma 3's 262k pieces: Processor.grammar_tokenizer keeps it."""
    view = llguidance.TokenizerWrapper(VocabularyView(tokenizer))
    return llguidance.LLTokenizer(view, n_vocab=tokenizer.vocab_size, eos_token=list(EOS_IDS))


class VocabularyView:
    """What llguidance.LLTokenizer reads from a tokenizer: the bytes of each id, the special ids, and an encoder."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = EOS_IDS[-1]
        self.bos_token_id = None  # prompts carry their own <bos>; grammars never produce it
        self.special_token_ids = sorted(
            i for i in tokenizer.special_ids.values() if i < tokenizer.vocab_size and is_special_piece(tokenizer, i)
        )
        special = set(self.special_token_ids)
        self.tokens = [
            SPECIAL_MARK + tokenizer.piece(i).encode() if i in special else piece_bytes(tokenizer, i)
            for i in range(tokenizer.vocab_size)
        ]

    def __call__(self, data: bytes) -> list[int]:
        """Ids for `data` as SentencePiece writes text; bytes after the last whole UTF-8 character as byte pieces."""
        text = data.decode("utf-8", errors="ignore")
        whole = len(text.encode())
        if data[:whole] != text.encode():  # an invalid byte inside: every byte a piece of its own
            return [self.tokenizer.byte_id(b) for b in data]
        return [
            *self.tokenizer.encode(text, add_bos=False, parse_special=False),
            *(self.tokenizer.byte_id(b) for b in data[whole:]),
        ]


def is_special_piece(tokenizer: Tokenizer, i: int) -> bool:
    """Control and unknown pieces, and user-defined ones written like tags (<start_of_turn>); not whitespace runs."""
    piece = tokenizer.piece(i)
    return not tokenizer.is_user_defined(i) or piece.startswith("<") and piece.endswith(">")


def piece_bytes(tokenizer: Tokenizer, i: int) -> bytes:
    """The bytes one id adds to the text: a byte piece its byte, any other piece its text with ▁ as a space."""
    byte = tokenizer.byte_value(i)
    if byte is not None:
        return bytes([byte])
    return tokenizer.piece(i).replace(SPACE_MARK, " ").encode()


def grammar_text(json_schema=None, regex: str | None = None, grammar: str | None = None) -> str | None:
    """The llguidance grammar for at most one of: a JSON schema (a dict, a JSON string, or a pydantic model class),
    a regular expression, a Lark grammar; None when none is given. Errors name what is wrong."""
    given = [
        name
        for name, value in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar))
        if value is not None
    ]
    if len(given) > 1:
        raise Gemma3Error(f"pass one constraint at a time, got {' and '.join(given)}")
    if not given:
        return None
    if json_schema is not None:
        text = llguidance.LLMatcher.grammar_from_json_schema(schema_dict(json_schema), defaults=JSON_LAYOUT)
    elif regex is not None:
        text = llguidance.LLMatcher.grammar_from_regex(checked_string(regex, "regex"))
    else:
        text = llguidance.LLMatcher.grammar_from_lark(checked_string(grammar, "grammar"))
    check_grammar(text, given[0])
    return text


def schema_dict(json_schema) -> dict:
    """A JSON schema as a dict, from a dict, a JSON string or a pydantic model class (its model_json_schema())."""
    if isinstance(json_schema, type) and hasattr(json_schema, "model_json_schema"):
        json_schema = json_schema.model_json_schema()
    if isinstance(json_schema, str):
        try:
            json_schema = json.loads(json_schema)
        except json.JSONDecodeError as e:
            raise Gemma3Error(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(json_schema, dict):
        raise Gemma3Error(
            "json_schema must be a dict (a JSON schema), its JSON text, or a pydantic model class, "
            f"got {type(json_schema).__name__}"
        )
    return json_schema


def checked_string(value, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise Gemma3Error(f"{name} must be a non-empty string, got {value!r:.80}")
    return value


def check_grammar(text: str, what: str) -> None:
    """One clear error when llguidance refuses the grammar (an unsupported schema keyword, a bad regex, ...)."""
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    if failed:
        raise Gemma3Error(f"{what} cannot be used for constrained decoding: {messages[0]}")


def ordered_items(items: list[tuple[str, bool]], separator: str) -> str | None:
    """Lark for `items` — (lark item, required) — in order, joined by `separator`, each optional one free to be left
    out; None when all may be."""
    if not items:
        return None
    (first, needed), rest = items[0], items[1:]
    joint = json.dumps(separator)
    tail = " ".join(f"{joint} {item}" if required else f"({joint} {item})?" for item, required in rest)
    with_first = f"{first} {tail}".strip()
    if needed:
        return with_first
    without = ordered_items(rest, separator)
    either = f"({with_first} | {without})" if without else f"({with_first})"
    return either if any(required for _, required in rest) else either + "?"
