"""The tokenizer against transformers' GemmaTokenizer on one small SentencePiece model with Gemma's settings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import sentencepiece as spm
from spm_fixture import CORPUS, reference, special_pieces, train_tokenizer

from mlx_gemma3.errors import Gemma3Error
from mlx_gemma3.processing.tokenizer import BOS_ID, END_OF_TURN_ID, START_OF_TURN_ID, Tokenizer

WHOLE = "\n".join(CORPUS)


@pytest.fixture(scope="session")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spm")
    train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def ours(folder, hf) -> Tokenizer:
    return Tokenizer.from_folder(folder)  # with the tokenizer_config.json the reference wrote


@pytest.fixture(scope="session")
def hf(folder):
    return reference(folder)


def stream(tokenizer: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    detokenizer = tokenizer.detokenizer(**kwargs)
    return [detokenizer.add(i) for i in ids] + [detokenizer.finish()]


def test_fixture_is_deterministic(folder, tmp_path):
    assert train_tokenizer(tmp_path).read_bytes() == (folder / "tokenizer.model").read_bytes()


def test_reference_follows_the_model_settings(folder, hf):
    """transformers' converted tokenizer must tokenize as SentencePiece does: no dummy prefix, digits split,
    byte fallback. (SentencePiece spells control pieces out, so lines naming them are left out here.)"""
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    control = [p for p, i in special_pieces(folder / "tokenizer.model").items() if sp.IsControl(i) or sp.IsUnknown(i)]
    for line in [text for text in CORPUS if not any(p in text for p in control)]:
        assert hf.encode(line, add_special_tokens=False) == sp.EncodeAsIds(line), line
    pieces = hf.tokenize("Hello 12")
    assert not pieces[0].startswith("▁") and pieces[-3:] == ["▁", "1", "2"]
    assert hf.tokenize("🦀") == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]


@pytest.mark.parametrize("text", [*CORPUS, WHOLE])
def test_encode_and_decode_match_transformers(ours, hf, text):
    ids = hf.encode(text)
    assert ours.encode(text) == ids
    assert ours.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", [line for line in CORPUS if "<" in line])
def test_unparsed_special_tokens_stay_text_as_in_transformers(ours, hf, text):
    assert ours.encode(text, parse_special=False) == hf.encode(text, split_special_tokens=True)


def test_special_tokens_in_text_become_their_ids(folder, ours, hf):
    for piece in special_pieces(folder / "tokenizer.model"):
        assert ours.token_id(piece) == hf.convert_tokens_to_ids(piece)
        assert ours.encode(f"a {piece}b") == hf.encode(f"a {piece}b")
    text = "<start_of_turn>user\nhi<end_of_turn>"
    assert hf.encode(text)[:2] == [BOS_ID, START_OF_TURN_ID] and hf.encode(text)[-1] == END_OF_TURN_ID
    assert ours.encode(text) == hf.encode(text)
    assert ours.token_id("<end_of_turn>") == hf.convert_tokens_to_ids("<end_of_turn>") == END_OF_TURN_ID


def test_literal_bos_is_the_bos_token_as_in_transformers(ours, hf):
    """transformers parses a written <bos> to id 2, so a template that writes it gets two BOS after add_bos."""
    assert ours.encode("<bos>hi") == hf.encode("<bos>hi")
    assert ours.encode("<bos>hi")[:2] == [BOS_ID, BOS_ID]


def test_special_ids_lists_the_special_pieces(folder, ours):
    assert ours.special_ids == special_pieces(folder / "tokenizer.model")


def test_image_soft_token_appended_after_the_model_as_in_gemma3(tmp_path):
    train_tokenizer(tmp_path, image_soft_token=False)
    size = Tokenizer(tmp_path / "tokenizer.model").vocab_size
    hf = reference(tmp_path, extra={"<image_soft_token>": size})
    ours = Tokenizer.from_folder(tmp_path)
    text = "<start_of_image><image_soft_token><image_soft_token><end_of_image>"
    assert ours.token_id("<image_soft_token>") == hf.convert_tokens_to_ids("<image_soft_token>")
    assert ours.encode(text) == hf.encode(text)
    assert ours.decode(hf.encode(text)) == hf.decode(hf.encode(text))
    assert ours.decode(hf.encode(text), skip_special=True) == hf.decode(hf.encode(text), skip_special_tokens=True)


def test_unknown_ids_decode_to_nothing_as_in_transformers(ours, hf):
    ids = [*hf.encode("ab", add_special_tokens=False), ours.vocab_size + 7, *hf.encode("c", add_special_tokens=False)]
    assert ours.decode(ids) == hf.decode(ids)


# Each run of byte pieces here spells one character, so a cut leaves an invalid run with no whole character in it.
ONE_CHARACTER_RUNS = ["a\U0001f980b", "\U0001f980", "\xe9", "x \U0001f980<end_of_turn>\U0001f980 "]


@pytest.mark.parametrize("text", ONE_CHARACTER_RUNS)
def test_cut_byte_sequences_decode_as_in_transformers(ours, hf, text):
    ids = hf.encode(text, add_special_tokens=False)
    for cut in range(len(ids) + 1):
        assert ours.decode(ids[:cut]) == hf.decode(ids[:cut]), ids[:cut]
        assert ours.decode(ids[cut:]) == hf.decode(ids[cut:]), ids[cut:]


@pytest.mark.parametrize("text", [*ONE_CHARACTER_RUNS, "\xe9\u4e2d\U0001f980"])
def test_invalid_bytes_inside_a_run_decode_as_in_sentencepiece(folder, ours, text):
    """Deviation: where a run of byte pieces is invalid UTF-8, transformers' ByteFallback decoder turns every
    byte of the run into U+FFFD, even those of whole characters; SentencePiece (and so we) replaces only the
    bad bytes. That keeps decoding local, which streaming needs, so here SentencePiece is the reference."""
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ids = sp.EncodeAsIds(text)
    for cut in range(len(ids)):
        for part in (ids[:cut] + ids[cut + 1 :], ids[cut:], ids[:cut]):
            assert ours.decode(part) == sp.DecodeIds(part), part
            assert "".join(stream(ours, part)) == sp.DecodeIds(part), part


def test_streaming_matches_sentencepiece_on_mangled_bytes(folder, ours):
    """Characters spelled in byte pieces, then bytes dropped, inserted or replaced by invalid ones."""
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    byte_id = {int(sp.IdToPiece(i)[3:5], 16): i for i in range(sp.GetPieceSize()) if sp.IsByte(i)}
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(chr(rng.choice([0xE9, 0x4E2D, 0x1F980, rng.randint(0x80, 0x10FFFF)])) for _ in range(4))
        ids = [byte_id[b] for b in text.encode("utf-8", "surrogatepass")] + sp.EncodeAsIds("ab")
        for _ in range(rng.randint(1, 3)):
            ids.insert(rng.randrange(len(ids)), byte_id[rng.choice([0x80, 0xBF, 0xC0, 0xE0, 0xED, 0xF0, 0xF5, 0xFF])])
            del ids[rng.randrange(len(ids))]
        assert "".join(stream(ours, ids)) == sp.DecodeIds(ids), ids


@pytest.mark.parametrize("text", [*CORPUS, WHOLE])
def test_streaming_matches_the_full_decode(ours, hf, text):
    ids = hf.encode(text)
    chunks = stream(ours, ids)
    assert "".join(chunks) == hf.decode(ids)
    assert "\ufffd" not in "".join(chunks)
    for chunk in chunks:
        assert chunk.encode("utf-8").decode("utf-8") == chunk


def test_streaming_skips_special_tokens_as_asked(ours, hf):
    ids = hf.encode(WHOLE)
    assert "".join(stream(ours, ids, skip_special=True)) == hf.decode(ids, skip_special_tokens=True)


def test_streaming_holds_the_bytes_of_a_split_emoji(ours, hf):
    ids = hf.encode("a \U0001f980b", add_special_tokens=False)
    crab = [i for i, piece in zip(ids, hf.convert_ids_to_tokens(ids)) if piece.startswith("<0x")]
    assert len(crab) == 4
    chunks = stream(ours, ids)
    first = ids.index(crab[0])
    assert chunks[first : first + 3] == ["", "", ""]
    assert chunks[first + 3] == hf.decode(crab) == "\U0001f980"
    assert "".join(chunks) == hf.decode(ids)


def test_streaming_flushes_an_unfinished_character(ours, hf):
    ids = hf.encode("a\U0001f980", add_special_tokens=False)[:-1]
    chunks = stream(ours, ids)
    assert chunks[-1] == hf.decode(ids[-3:]) and "".join(chunks) == hf.decode(ids)


def test_streaming_decodes_a_bounded_window(ours, monkeypatch):
    """O(n): each step decodes at most the last character's four pieces, never the history."""
    sizes = []
    decode = ours.decode
    monkeypatch.setattr(ours, "decode", lambda ids, *a: sizes.append(len(ids)) or decode(ids, *a))
    stream(ours, ours.encode(WHOLE * 3))
    assert max(sizes) <= 4


def test_unreadable_model_and_unknown_piece_raise(ours, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(Gemma3Error, match="cannot read tokenizer"):
        Tokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(Gemma3Error, match="no piece"):
        ours.token_id("<no_such_piece>")
