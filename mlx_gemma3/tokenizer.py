"""SentencePiece tokenizer with Gemma 3's special ids."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from .errors import Gemma3Error

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
START_OF_TURN_ID, END_OF_TURN_ID = 105, 106


class Tokenizer:
    """Encodes text to ids (BOS first) and decodes ids back to text."""

    def __init__(self, model_file: str | Path):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except (OSError, RuntimeError) as e:
            raise Gemma3Error(f"cannot read tokenizer {model_file}: {e}") from None

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer | None":
        path = Path(folder) / "tokenizer.model"
        return cls(path) if path.is_file() else None

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return [BOS_ID, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(list(ids))
