"""SentencePiece tokenizer with Gemma 3's special tokens, parsed in text and kept in decoded text.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from ..errors import Gemma3Error

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
START_OF_TURN_ID, END_OF_TURN_ID = 105, 106
EOS_IDS = (EOS_ID, END_OF_TURN_ID)  # an instruction-tuned Gemma 3 ends its turn with either
# Gemma 3 appends this one after the 262144 SentencePiece pieces; it is not in tokenizer.model.
IMAGE_SOFT_TOKEN = "<image_soft_token>"

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


class Tokenizer:
    """Encodes text to ids (BOS first) and decodes ids back to text, special tokens included."""

    def __init__(self, model_file: str | Path, flagged_special: set[str] = frozenset()):
        """`flagged_special`: pieces a tokenizer_config.json marks special; decode(skip_special=True) drops
        them with the control pieces (whitespace runs and other user-defined pieces stay)."""
        self._sp = _processor(lambda sp: sp.Load(str(model_file)), model_file)
        _check_pieces(self._sp, model_file)
        self._size = size = self._sp.GetPieceSize()
        types = _piece_types(self._sp.serialized_model_proto())
        special = (i for i, kind in enumerate(types) if kind in (_UNKNOWN, _CONTROL, _USER_DEFINED))
        self.special_ids: dict[str, int] = {self._sp.IdToPiece(i): i for i in special}
        self.special_ids.setdefault(IMAGE_SOFT_TOKEN, size)
        # SentencePiece itself matches user-defined pieces in text; the rest it would spell out.
        self._literal = {p: i for p, i in self.special_ids.items() if i >= size or types[i] != _USER_DEFINED}
        self._literal_start = re.compile("[" + "".join(sorted({re.escape(p[0]) for p in self._literal})) + "]")
        self._literal_lengths = sorted({len(p) for p in self._literal}, reverse=True)
        self._text = {i: p for p, i in self._literal.items()}
        skipped = {i for i, kind in enumerate(types) if kind in (_UNKNOWN, _CONTROL)} | {size}
        self._special_set = frozenset(skipped | {i for p, i in self.special_ids.items() if p in flagged_special})
        self._byte = {i: int(self._sp.IdToPiece(i)[3:5], 16) for i, kind in enumerate(types) if kind == _BYTE}
        self._byte_ids = {byte: i for i, byte in self._byte.items()}
        self._user_defined = frozenset(i for i, kind in enumerate(types) if kind == _USER_DEFINED)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer | None:
        path = Path(folder) / "tokenizer.model"
        return cls(path, _flagged_special(Path(folder) / "tokenizer_config.json")) if path.is_file() else None

    @property
    def vocab_size(self) -> int:
        return self._size

    def token_id(self, piece: str) -> int:
        """The id of one piece, e.g. token_id("<end_of_turn>") == 106."""
        if piece in self.special_ids:
            return self.special_ids[piece]
        i = self._sp.PieceToId(piece)
        if i == self._sp.unk_id() and piece != self._sp.IdToPiece(i):
            raise Gemma3Error(f"the tokenizer has no piece {piece!r}")
        return i

    def piece(self, i: int) -> str:
        """The vocabulary's piece for an id, as SentencePiece stores it (▁ for a space, <0x0A> for a byte)."""
        return self._text.get(i) or self._sp.IdToPiece(i)

    def byte_value(self, i: int) -> int | None:
        """The byte a byte-fallback piece (<0x41>) stands for; None for any other piece."""
        return self._byte.get(i)

    def byte_id(self, byte: int) -> int:
        """The id of the byte-fallback piece for `byte`."""
        return self._byte_ids[byte]

    def is_user_defined(self, i: int) -> bool:
        return i in self._user_defined

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]:
        """parse_special: special tokens written in text become their ids (as in transformers); else plain text."""
        _check_text(text)
        ids = self._encode_parsed(text) if parse_special else self._plain.EncodeAsIds(text)
        return [BOS_ID, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Special tokens come out as their text (as in transformers) unless skip_special."""
        parts, run = [], []
        for i in ids:
            if self._dropped(i, skip_special):
                continue
            if i in self._text:
                parts += [self._sp.DecodeIds(run), self._text[i]]
                run = []
            else:
                run.append(i)
        return "".join([*parts, self._sp.DecodeIds(run)])

    def detokenizer(self, skip_special: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special)

    def _dropped(self, i: int, skip_special: bool) -> bool:
        """Ids decode leaves out: special ones when skipping them, ids outside the vocabulary (as transformers)."""
        return skip_special and i in self._special_set or not (0 <= i < self._size or i in self._text)

    def _encode_parsed(self, text: str) -> list[int]:
        ids, start, pos = [], 0, 0
        while match := self._literal_start.search(text, pos):
            pos = match.start()
            piece = self._literal_at(text, pos)
            if piece is None:
                pos += 1
                continue
            ids += [*self._sp.EncodeAsIds(text[start:pos]), self._literal[piece]]
            start = pos = pos + len(piece)
        return ids + self._sp.EncodeAsIds(text[start:])

    def _literal_at(self, text: str, pos: int) -> str | None:
        """The longest special piece that SentencePiece would not match itself written at text[pos]."""
        return next((text[pos : pos + n] for n in self._literal_lengths if text[pos : pos + n] in self._literal), None)

    @cached_property
    def _plain(self) -> spm.SentencePieceProcessor:
        """The same model with user-defined pieces made control pieces, which SentencePiece never matches in text."""
        proto = _retype(self._sp.serialized_model_proto(), _USER_DEFINED, _CONTROL)
        return _processor(lambda sp: sp.LoadFromSerializedProto(proto), "the tokenizer")


def single_token_ids(tokenizer: Tokenizer | None, texts: list[str], what: str = "a stop token") -> list[int]:
    """The id of each text, each of which must be exactly one token of the vocabulary (e.g. "<end_of_image>")."""
    if texts and tokenizer is None:
        raise Gemma3Error(f"{what} needs the model's tokenizer.model, and this folder has none")
    ids = []
    for text in texts:
        encoded = tokenizer.encode(text, add_bos=False)
        if len(encoded) != 1:
            pieces = [tokenizer.decode([i]) for i in encoded]
            raise Gemma3Error(
                f"{what} {text!r} is {len(encoded)} tokens of this vocabulary {pieces}, not one: "
                "pass a single token (such as '<end_of_turn>' or a word the vocabulary holds whole)"
            )
        ids += encoded
    return ids


class StreamingDetokenizer:
    """Text for ids one at a time: add(id) returns what it completed, finish() the rest.

    The pieces of a character split into bytes are held until the character is whole, so no chunk
    carries a broken character; everything else goes out at once, and decoding restarts after it."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tokenizer, self._skip_special = tokenizer, skip_special
        self._pending: list[int] = []

    def add(self, token_id: int) -> str:
        if self._tokenizer._dropped(token_id, self._skip_special):
            return ""
        self._pending.append(token_id)
        return "" if self._mid_character() else self.finish()

    def finish(self) -> str:
        text = self._tokenizer.decode(self._pending, self._skip_special)
        self._pending = []
        return text

    def _mid_character(self) -> bool:
        """Whether the trailing byte pieces end inside a UTF-8 character that more bytes could complete."""
        tail = []
        for i in reversed(self._pending[-4:]):
            if i not in self._tokenizer._byte:
                break
            tail.append(self._tokenizer._byte[i])
        for back, byte in enumerate(tail, start=1):
            if byte & 0xC0 != 0x80:
                return _utf8_length(byte) > back
        return False


def sequence_ends(folder: str | Path) -> tuple[bool, bool]:
    """(adds <bos>, adds <eos>) when the tokenizer encodes one text, as transformers decides it for this folder:
    tokenizer_config.json's add_bos_token / add_eos_token, else tokenizer.json's post-processor template, else
    Gemma's default (<bos> only). Chat prompts carry their own <bos>; this matters for texts encoded whole
    (EmbeddingGemma's tokenizer adds both)."""
    folder = Path(folder)
    config = _json_object(folder / "tokenizer_config.json")
    template = ((_json_object(folder / "tokenizer.json").get("post_processor") or {}).get("single")) or []
    pieces = [
        (part.get("SpecialToken") or {}).get("id") if isinstance(part, dict) else None
        for part in (template if isinstance(template, list) else [])
    ]
    bos = config.get("add_bos_token", pieces[0] == "<bos>" if pieces else True)
    eos = config.get("add_eos_token", pieces[-1] == "<eos>" if pieces else False)
    return bool(bos), bool(eos)


def _json_object(path: Path) -> dict:
    """A JSON file's object, or {} when the file is absent or holds something else."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _flagged_special(config: Path) -> set[str]:
    """Pieces tokenizer_config.json's added_tokens_decoder marks special (none when there is no such file)."""
    try:
        added = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
    except (OSError, ValueError, AttributeError):
        return set()
    return {t["content"] for t in added.values() if isinstance(t, dict) and t.get("special") and "content" in t}


def _utf8_length(lead: int) -> int:
    return 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1


def _processor(load, where) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        load(sp)
    except (OSError, RuntimeError) as e:
        raise Gemma3Error(f"cannot read tokenizer {where}: {e}") from None
    except UnicodeDecodeError:  # SentencePiece's own error message quotes the damaged bytes
        raise Gemma3Error(
            f"cannot read tokenizer {where}: it is damaged (SentencePiece's error is not UTF-8)"
        ) from None
    return sp


def _check_text(text: str) -> None:
    """SentencePiece takes UTF-8 only: a lone UTF-16 surrogate (JSON's "\\ud800") cannot be encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Gemma3Error(
            f"the text holds {e.object[e.start : e.end]!r} at {e.start}, a lone UTF-16 surrogate, which is not text"
        ) from None
    except AttributeError:
        raise Gemma3Error(f"the tokenizer encodes text (str), got {type(text).__name__}") from None


def _check_pieces(sp: spm.SentencePieceProcessor, where) -> None:
    """SentencePiece loads pieces that are not UTF-8 and fails only when one is read: refuse them up front."""
    for i in range(sp.GetPieceSize()):
        try:
            sp.IdToPiece(i)
        except UnicodeDecodeError:
            raise Gemma3Error(f"cannot read tokenizer {where}: piece {i} is not UTF-8 — the file is damaged") from None


# tokenizer.model is a protobuf ModelProto; reading its wire format directly spares a protobuf dependency.
def _piece_types(proto: bytes) -> list[int]:
    return [kind for kind, _ in _type_fields(proto)]


def _retype(proto: bytes, old: int, new: int) -> bytes:
    out = bytearray(proto)
    for kind, at in _type_fields(proto):
        if kind == old:
            out[at] = new
    return bytes(out)


def _type_fields(proto: bytes) -> list[tuple[int, int | None]]:
    """(type, offset of its one-byte value) of each piece: ModelProto field 1, SentencePiece field 3."""
    fields, pos = [], 0
    while pos < len(proto):
        key, pos = _varint(proto, pos)
        if key != (1 << 3 | 2):
            pos = _skip(proto, pos, key & 7)
            continue
        size, pos = _varint(proto, pos)
        fields.append(_piece_type(proto, pos, pos + size))
        pos += size
    return fields


def _piece_type(proto: bytes, pos: int, end: int) -> tuple[int, int | None]:
    kind, at = _NORMAL, None
    while pos < end:
        key = proto[pos]
        pos += 1
        if key == 0x0A and proto[pos] < 0x80:  # the piece's text, shorter than 128 bytes
            pos += 1 + proto[pos]
        elif key == 0x15:  # its score, a 4-byte float
            pos += 4
        elif key == 0x18:  # its type, one byte
            at, kind = pos, proto[pos]
            pos += 1
        else:
            key, pos = _varint(proto, pos - 1)
            pos = _skip(proto, pos, key & 7)
    return kind, at


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _skip(buf: bytes, pos: int, wire: int) -> int:
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 2:
        size, pos = _varint(buf, pos)
        return pos + size
    return pos + {1: 8, 5: 4}[wire]
