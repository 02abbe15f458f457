"""tokenizer.model rebuilt from GGUF metadata: the real Gemma 3 270M file against transformers' GGUF tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import pytest
from sentencepiece import sentencepiece_model_pb2
from spm_fixture import CORPUS, train_tokenizer

from mlx_gemma3.convert.gguf_file import read_gguf
from mlx_gemma3.convert.gguf_tokenizer import chat_template, sentencepiece_model
from mlx_gemma3.errors import Gemma3Error
from mlx_gemma3.processing.tokenizer import Tokenizer

LINES = (Path(__file__).parent / "data" / "multilingual.txt").read_text(encoding="utf-8").split("\n")
BLOCKS = ["\n".join(LINES[i : i + 10]) for i in range(0, len(LINES), 10)]
SPECIAL = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<start_of_turn>": 105,
    "<end_of_turn>": 106,
    "<start_of_image>": 255999,
    "<end_of_image>": 256000,
}
SOFT = "<image_soft_token>"
# Gemma's longest space-run piece holds 31 spaces (id 167); runs past it are where the two sides split differently.
LONG_SPACES = re.compile(" {32,}")


@pytest.fixture(scope="session")
def reader(gguf_file):
    return read_gguf(gguf_file)


@pytest.fixture(scope="session")
def ours(reader, gguf_file, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("gguf_tokenizer") / "tokenizer.model"
    path.write_bytes(sentencepiece_model(reader, str(gguf_file)))
    return Tokenizer(path)


@pytest.fixture(scope="session")
def ref(gguf_file):
    """transformers' tokenizer built from the same GGUF (~25 s, once per session)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def _neutral(text: str) -> str:
    """text without the two constructs where transformers' GGUF tokenizer departs from Gemma's (tests below)."""
    return LONG_SPACES.sub(" " * 31, text.replace(SOFT, "<start_of_image>"))


def _mismatches(texts, ours, ref) -> set[int]:
    return {n for n, text in enumerate(texts) if ours.encode(text) != ref.encode(text)}


@pytest.mark.slow
def test_real_file_stores_space_runs_with_spaces_and_no_chat_template(reader):
    tokens = reader.metadata["tokenizer.ggml.tokens"]
    spaced = [i for i, token in enumerate(tokens) if " " in token]
    assert spaced == list(range(138, 168)) and all(set(tokens[i]) == {" "} for i in spaced)
    assert tokens[236743] == "\u2581" and tokens[506] == "\u2581the"  # ordinary pieces keep SentencePiece's ▁
    assert chat_template(reader) is None


@pytest.mark.slow
def test_rebuilt_model_has_gemmas_settings(ours):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(ours._sp.serialized_model_proto())
    assert [p.piece for p in proto.pieces[138:140]] == ["\u2581\u2581", "\u2581\u2581\u2581"]
    assert not any(" " in p.piece for p in proto.pieces)
    assert proto.pieces[3].type == proto.pieces[3].UNKNOWN and proto.pieces[138].type == proto.pieces[138].USER_DEFINED
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    assert trainer.model_type == trainer.BPE and trainer.byte_fallback and trainer.split_digits
    assert (trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id) == (3, 2, 1, 0)
    assert normalizer.name == "identity" and not normalizer.precompiled_charsmap
    assert not normalizer.add_dummy_prefix and not normalizer.remove_extra_whitespaces


@pytest.mark.slow
def test_vocabulary_and_special_ids_match_transformers(ours, ref):
    assert ours.vocab_size == len(ref) == 262144
    for piece, i in SPECIAL.items():
        assert ours.token_id(piece) == ref.convert_tokens_to_ids(piece) == i
        assert ours.encode(piece, add_bos=False) == ref.encode(piece, add_special_tokens=False) == [i]
        assert ours.decode([i]) == ref.decode([i]) == piece
    assert (ref.pad_token_id, ref.eos_token_id, ref.bos_token_id, ref.unk_token_id) == (0, 1, 2, 3)


@pytest.mark.parametrize("unit", ["lines", "blocks"])
def test_corpus_matches_transformers_outside_two_documented_classes(ours, ref, unit):
    texts = LINES if unit == "lines" else BLOCKS
    assert len(texts) >= (1000 if unit == "lines" else 100)
    constructs = {n for n, text in enumerate(texts) if SOFT in text or LONG_SPACES.search(text)}
    assert constructs and _mismatches(texts, ours, ref) == constructs
    assert not _mismatches([_neutral(texts[n]) for n in sorted(constructs)], ours, ref)
    # transformers drops id 262144 in decode, as it is past the GGUF's vocabulary; all else decodes alike.
    wrong = {n for n, text in enumerate(texts) if ours.decode(ids := ours.encode(text)) != ref.decode(ids)}
    assert wrong == {n for n, text in enumerate(texts) if SOFT in text}
    # SentencePiece writes spaces as ▁, so a ▁ in the text comes back as a space (in Gemma's tokenizer too).
    assert all(ours.decode(ours.encode(text)) == "<bos>" + text.replace("\u2581", " ") for text in texts)


def test_image_soft_token_is_gemmas_id_262144_which_the_gguf_lacks(ours, ref):
    """Gemma 3's tokenizer appends <image_soft_token> as id 262144, but llama.cpp trims the GGUF's vocabulary
    to the 262144 SentencePiece pieces, so transformers' GGUF tokenizer spells it out as plain text."""
    assert ours.encode(SOFT, add_bos=False) == [262144]
    assert SOFT not in ref.get_vocab() and 262144 not in ref.encode(SOFT)
    assert ref.decode(ref.encode(SOFT, add_special_tokens=False)) == SOFT


def test_space_runs_take_the_longest_piece_first_as_in_sentencepiece(ours, ref):
    """The GGUF marks the space runs user-defined, which SentencePiece (and llama.cpp, and Gemma's own
    tokenizer.json as added tokens) match longest first. transformers respells them ▁ but adds them as
    tokens only under their GGUF spelling, which its vocabulary no longer holds, so its BPE merges split
    the runs instead. The two agree on runs of up to 31 spaces (the longest piece) and part ways past it."""
    for n in range(2, 32):
        assert ours.encode(" " * n + "x", add_bos=False) == ref.encode(" " * n + "x", add_special_tokens=False)
    assert ours.encode(" " * 38, add_bos=False) == _run(31) + _run(7)
    assert ours.encode(" " * 70, add_bos=False) == _run(31) * 2 + _run(8)
    assert ref.encode(" " * 38, add_special_tokens=False) != _run(31) + _run(7)
    assert ref.decode(ref.encode(" " * 38, add_special_tokens=False)) == " " * 38


def test_streaming_detokenizer_concatenates_to_decode(ours):
    for text in BLOCKS:
        ids = ours.encode(text)
        stream = ours.detokenizer()
        assert "".join(stream.add(i) for i in ids) + stream.finish() == ours.decode(ids)


def test_tiny_gguf_round_trips_a_trained_sentencepiece_model(tmp_path):
    """A llama.cpp-style GGUF (unk typed control, scores kept) of a small trained model encodes as the model."""
    original = train_tokenizer(tmp_path)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(original.read_bytes())
    types = [3 if p.type == p.UNKNOWN else int(p.type) for p in proto.pieces]
    path = _write_gguf(tmp_path / "tiny.gguf", [p.piece for p in proto.pieces], [p.score for p in proto.pieces], types)
    (tmp_path / "rebuilt").mkdir()
    rebuilt = tmp_path / "rebuilt" / "tokenizer.model"
    rebuilt.write_bytes(sentencepiece_model(read_gguf(path), str(path)))
    theirs, ours = Tokenizer(original), Tokenizer(rebuilt)
    for text in CORPUS:
        assert ours.encode(text) == theirs.encode(text)
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("scores", None, "no tokenizer.ggml.scores"),
        ("types", None, "no tokenizer.ggml.token_type"),
        ("model", None, "no tokenizer.ggml.model"),
        ("model", "gpt2", "tokenizer.ggml.model is 'gpt2'; Gemma 3 needs 'llama'"),
    ],
)
def test_unusable_tokenizer_metadata_is_one_clear_error(tmp_path, key, value, message):
    args = dict(scores=[0.0] * 6, types=[3, 3, 3, 2, 1, 1], model="llama")
    path = _write_gguf(tmp_path / "bad.gguf", ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b"], **{**args, key: value})
    with pytest.raises(Gemma3Error) as error:
        sentencepiece_model(read_gguf(path), str(path))
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def _run(n: int) -> list[int]:
    """The id of the piece of n spaces, 2 <= n <= 31."""
    return [138 + n - 2]


def _write_gguf(path: Path, tokens, scores, types, model: str | None = "llama") -> Path:
    """A GGUF with tokenizer metadata only; None leaves a key out. User-defined ▁ become spaces, as in llama.cpp."""
    writer = gguf.GGUFWriter(path, "gemma3")
    if model is not None:
        writer.add_tokenizer_model(model)
    kinds = types or [1] * len(tokens)
    writer.add_token_list([t.replace("\u2581", " ") if kind == 4 else t for t, kind in zip(tokens, kinds)])
    if scores is not None:
        writer.add_token_scores(scores)
    if types is not None:
        writer.add_token_types(types)
    for key, i in (("unknown", 3), ("bos", 2), ("eos", 1), ("padding", 0)):
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", i)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path
