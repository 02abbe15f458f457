"""A tiny SentencePiece model trained with Gemma's settings, and multilingual test text for it."""

from __future__ import annotations

import io
import json
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2

SPECIAL_PIECES = ["<pad>", "<eos>", "<bos>", "<unk>"]
# <mask> lands on id 4 as a control piece, which SentencePiece spells out in text; user-defined pieces follow.
CONTROL_SYMBOLS = ["<mask>"]
USER_SYMBOLS = [
    *(f"<unused{i}>" for i in range(100)),
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a test of the tokenizer, with some words repeated: the the the and and.",
    "In the beginning there was text, and the text was tokenized into pieces.",
    "    indented line with four spaces",
    "\tdef main():\n\t\treturn 0",
    "for i in range(10):\n    print(i * 2)",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 12345 67890 3.14159 2024-01-01",
    "안녕하세요 세계. 한국어 문장입니다. 안녕하세요!",
    "こんにちは世界。日本語の文です。こんにちは！",
    "你好世界。这是中文句子。你好！",
    "مرحبا بالعالم. هذه جملة عربية.",
    "नमस्ते दुनिया। यह हिंदी वाक्य है।",
    "Emoji: 😀 😀 🎉 👍",
    "lots   of    spaces     here          and\n\n\nnewlines",
]


def _sentences():
    for repeat in range(8):
        for line in TRAINING_TEXT:
            # Latin text dominates, so rarer scripts fall partly to byte fallback and merges form.
            yield line * (1 + repeat % 3) * (1 if any(ord(c) > 127 for c in line) else 6)


def train_tokenizer(
    folder: Path, vocab_size: int = 512, image_soft_token: bool = True, extra_symbols: tuple[str, ...] = ()
) -> Path:
    """Train deterministically (one thread, fixed corpus) and write folder/tokenizer.model.

    image_soft_token=False leaves that piece out, as Gemma 3's own tokenizer.model does; `extra_symbols` are more
    user-defined pieces (FunctionGemma's markers, say)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.98,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece=SPECIAL_PIECES[0],
        eos_piece=SPECIAL_PIECES[1],
        bos_piece=SPECIAL_PIECES[2],
        unk_piece=SPECIAL_PIECES[3],
        control_symbols=CONTROL_SYMBOLS,
        user_defined_symbols=[*(USER_SYMBOLS if image_soft_token else USER_SYMBOLS[:-1]), *extra_symbols],
        num_threads=1,
        minloglevel=2,
    )
    path = Path(folder) / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


CORPUS = [
    "Hello world",
    " Hello world",
    "Hello world ",
    "  two leading spaces and two trailing  ",
    "The quick brown fox jumps over the lazy dog.",
    "Zebras quietly vexed jumpy wizards.",
    "multiple   inner    spaces",
    "line one\nline two\n\nline four",
    "\n\nstarts with newlines",
    "ends with newlines\n\n",
    "\ttab first\tand inside\t",
    "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2]}\n    return None",
    "class Foo:\n    def __init__(self):\n        self.x = 42  # comment",
    "digits 0123456789 and 3.14159e-10 and 1,000,000",
    "2025-12-31T23:59:59Z",
    "안녕하세요 세계",
    "한국어 토크나이저 테스트입니다. 새로운 단어들: 컴퓨터, 프로그래밍, 인공지능.",
    "こんにちは世界",
    "東京都渋谷区で寿司を食べました。カタカナ、ひらがな、漢字。",
    "你好世界",
    "机器学习模型正在处理自然语言。",
    "مرحبا بالعالم",
    "الذكاء الاصطناعي يغير العالم بسرعة.",
    "नमस्ते दुनिया",
    "कृत्रिम बुद्धिमत्ता और मशीन लर्निंग",
    "Ελληνικά: γειά σου κόσμε",
    "Русский текст: привет, мир!",
    "עברית: שלום עולם",
    "ไทย: สวัสดีชาวโลก",
    "Emoji 😀🎉👍",
    "family 👨‍👩‍👧‍👦 and 👩🏽‍💻 coder",
    "flags 🇰🇷🇯🇵🇺🇸🇪🇺",
    "🏳️‍🌈 rainbow flag and ❤️ heart",
    "math ∑∫√∞ ≠ ≤ ≥ and ÷ × ±",
    "accents: café naïve résumé Ångström",
    "combining: e\u0301 a\u0308 n\u0303",
    "zero width\u200bspace and nbsp\u00a0here",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "<start_of_turn>user\n안녕하세요 😀<end_of_turn>\n<start_of_turn>model\n",
    "text<start_of_image><image_soft_token><image_soft_token><end_of_image>more",
    "a literal <bos> and <eos> and <mask> in text",
    "<bos><start_of_turn>user\nhi<end_of_turn>",
    "almost special <start_of_turn <end_of_turn> <start_of_turn>>",
    "unused <unused0><unused99> pieces",
    "<pad> and <unk> written out",
    "<<bos>> nested and doubled <start_of_turn><start_of_turn>",
    "🦀<end_of_turn>🦀 bytes around a special token",
    "Wait , what ? It 's fine . Don 't clean up spaces !",
    "\n\n\n\n    \t\t  x   \n",
    "   ",
    " ",
    "\n",
    "a",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 and 𓀀 hieroglyph",
]


SPECIAL_TYPES = {
    sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN,
    sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL,
    sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED,
}


def special_pieces(model_file: Path) -> dict[str, int]:
    """Every unknown, control and user-defined piece, read from the model with protobuf."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return {p.piece: i for i, p in enumerate(proto.pieces) if p.type in SPECIAL_TYPES}


def reference(folder: Path, extra: dict[str, int] | None = None):
    """transformers' GemmaTokenizer built from folder/tokenizer.model, configured as Gemma 3's tokenizer_config.json.

    Built from tokenizer.model alone it adds no BOS (Gemma's config sets add_bos_token) and marks only
    control pieces special, so skip_special_tokens would keep <start_of_turn>; the config marks every
    unknown, control and user-defined piece special, plus pieces appended after the model (extra)."""
    from transformers import AutoTokenizer

    tokens = {**special_pieces(folder / "tokenizer.model"), **(extra or {})}
    decoder = {str(i): {"content": piece, "special": True, "normalized": False} for piece, i in tokens.items()}
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "added_tokens_decoder": decoder}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(folder)
