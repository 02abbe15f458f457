"""Training data: train/valid/test.jsonl in mlx-lm's formats (messages, prompt/completion, text), with images."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import Gemma3Error
from ..processing.image import process_images
from ..processing.prompt import IMAGE_MARK, chat_text, expand_image_tokens
from ..processing.tokenizer import BOS_ID, EOS_ID, PAD_ID
from .loss import Batch

__all__ = ["Encoder", "Example", "load_splits"]

SPLITS = ("train", "valid", "test")
FORMATS = '{"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}'
ASSISTANT_ROLES = ("assistant", "model")


@dataclass
class Example:
    """One sequence: token ids, a 0/1 loss weight per token (1: the model is trained to predict it), and the
    pixels of its images [N, H, W, 3] in prompt order."""

    ids: list[int]
    weights: list[int]
    pixels: np.ndarray | None = None
    where: str = ""


@dataclass
class Encoder:
    """Turns a parsed jsonl record into an Example for one model: its processor and the training choices."""

    processor: object
    mask_prompt: bool = False
    max_seq_length: int = 2048
    truncated: list[str] = field(default_factory=list)

    def example(self, record, base: Path, where: str) -> Example:
        if not isinstance(record, dict):
            raise Gemma3Error(f"{where}: each line must be a JSON object: {FORMATS}")
        if "messages" in record:
            return self.conversation(record["messages"], base, where)
        if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
            messages = [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]},
            ]
            return self.conversation(messages, base, where)
        if isinstance(record.get("text"), str) and record["text"]:
            ids = self.tokenizer.encode(record["text"], add_bos=True) + [EOS_ID]
            return self.fitted(Example(ids, [0] + [1] * (len(ids) - 1), None, where))
        raise Gemma3Error(f"{where}: unknown record with keys {sorted(record)[:5]}: each line must be {FORMATS}")

    @property
    def tokenizer(self):
        if self.processor.tokenizer is None:
            raise Gemma3Error("the model folder has no tokenizer.model: training data needs the tokenizer")
        return self.processor.tokenizer

    def conversation(self, messages, base: Path, where: str) -> Example:
        try:
            full = chat_text(messages, self.processor.chat_template, add_generation_prompt=False)
            sources = [self.image_path(item, base) for item in image_items(messages)]
            pixels, crops = self.images(sources)
            ids = self.encode(full, crops)
            weights = self.weights(messages, full, crops, len(ids))
        except Gemma3Error as e:
            raise Gemma3Error(f"{where}: {e}") from None
        return self.fitted(Example(ids, weights, pixels, where))

    def weights(self, messages: list[dict], full: str, crops: list[int], length: int) -> list[int]:
        """All ones (past the first token), or with mask_prompt ones only on the assistant turns' tokens."""
        if not self.mask_prompt:
            return [0] + [1] * (length - 1)
        weights = [0] * length
        for i, message in enumerate(messages):
            if message.get("role") not in ASSISTANT_ROLES:
                continue
            start = self.prefix_length(messages[:i], full, crops, add_generation_prompt=True)
            end = self.prefix_length(messages[: i + 1], full, crops, add_generation_prompt=False)
            weights[start:end] = [1] * (end - start)
        if not any(weights):
            raise Gemma3Error("--mask-prompt counts only assistant turns, and this conversation has none")
        return weights

    def prefix_length(self, messages: list[dict], full: str, crops: list[int], add_generation_prompt: bool) -> int:
        text = chat_text(messages, self.processor.chat_template, add_generation_prompt) if messages else ""
        if not full.startswith(text):
            raise Gemma3Error(
                "the chat template renders an earlier turn differently inside the whole conversation, "
                "so the assistant turns cannot be told apart: train without --mask-prompt"
            )
        return len(self.encode(text, crops[: text.count(IMAGE_MARK)]))

    def encode(self, text: str, crops: list[int]) -> list[int]:
        if crops:
            text = expand_image_tokens(text, crops, self.processor.config.vision.tokens_per_image)
        ids = self.tokenizer.encode(text, add_bos=False)
        return ids if ids[:1] == [BOS_ID] or not text else [BOS_ID, *ids]

    def image_path(self, item: dict, base: Path) -> Path:
        if self.processor.config.vision is None:
            raise Gemma3Error("the sample has an image but the model reads text only: use a multimodal Gemma 3")
        source = item.get("image") or item.get("path") or item.get("url")
        if not isinstance(source, str):
            raise Gemma3Error('an image item needs {"type": "image", "image": "path/to/file"}')
        path = Path(source) if Path(source).is_absolute() else base / source
        if not path.is_file():
            raise Gemma3Error(f"image {source} not found (relative paths start at {base})")
        return path

    def images(self, sources: list[Path]) -> tuple[np.ndarray | None, list[int]]:
        """Pixels [N, H, W, 3] and crop counts (none: no pan and scan in training) of a sample's images."""
        if not sources:
            return None, []
        return process_images(sources, self.processor.config.vision.image_size)

    def fitted(self, example: Example) -> Example:
        """The example cut to max_seq_length tokens (a sample with images must fit whole)."""
        if len(example.ids) <= self.max_seq_length:
            return example
        if example.pixels is not None:
            raise Gemma3Error(
                f"{example.where}: the sample has {len(example.ids)} tokens with its images, more than "
                f"--max-seq-length {self.max_seq_length}: raise it or shorten the sample"
            )
        self.truncated.append(example.where)
        return Example(example.ids[: self.max_seq_length], example.weights[: self.max_seq_length], None, example.where)


def image_items(messages) -> list[dict]:
    return [
        item
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for item in message["content"]
        if isinstance(item, dict) and item.get("type") == "image"
    ]


def read_jsonl(path: Path, encoder: Encoder) -> list[Example]:
    """Every line of a jsonl file as an Example; the first bad line raises one error naming file and line."""
    examples = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise Gemma3Error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            examples.append(encoder.example(record, path.parent, where))
    if not examples:
        raise Gemma3Error(f"{path} holds no examples: one JSON object per line, {FORMATS}")
    return examples


def load_splits(folder: str | Path, encoder: Encoder, names: tuple[str, ...]) -> dict[str, list[Example]]:
    """The named splits of a data folder (train.jsonl, valid.jsonl, test.jsonl), each one required."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Gemma3Error(
            f"--data {folder} is not a folder: give a folder with {', '.join(f'{n}.jsonl' for n in SPLITS)}"
        )
    missing = [f"{name}.jsonl" for name in names if not (folder / f"{name}.jsonl").is_file()]
    if missing:
        raise Gemma3Error(
            f"{folder} has no {missing[0]}: the data folder holds {', '.join(f'{n}.jsonl' for n in names)}"
        )
    return {name: read_jsonl(folder / f"{name}.jsonl", encoder) for name in names}


def collate(examples: list[Example]) -> Batch:
    """Examples as one right-padded Batch (padding counts for nothing in the loss)."""
    longest = max(len(example.ids) for example in examples)
    ids = np.full((len(examples), longest), PAD_ID, np.int32)
    weights = np.zeros((len(examples), longest), np.float32)
    for row, example in enumerate(examples):
        ids[row, : len(example.ids)] = example.ids
        weights[row, : len(example.weights)] = example.weights
    pixels = [example.pixels for example in examples if example.pixels is not None]
    return Batch(mx.array(ids), mx.array(weights), mx.array(np.concatenate(pixels)) if pixels else None)


def training_batch(examples: list[Example], batch_size: int, seed: int, step: int) -> Batch:
    """The batch of step `step` (0-based): each epoch a fresh seeded shuffle, so a resumed run sees the same batches."""
    per_epoch = len(examples) // batch_size
    if per_epoch == 0:
        raise Gemma3Error(f"the training set has {len(examples)} examples, fewer than --batch-size {batch_size}")
    epoch, index = divmod(step, per_epoch)
    order = np.random.RandomState((seed + epoch) % 2**32).permutation(len(examples))
    return collate([examples[i] for i in order[index * batch_size : (index + 1) * batch_size]])


def evaluation_batches(examples: list[Example], batch_size: int, num_batches: int):
    """Batches in file order (the last one may be smaller); at most num_batches of them (-1: all)."""
    starts = range(0, len(examples), batch_size)
    if num_batches >= 0:
        starts = starts[:num_batches]
    for start in starts:
        yield collate(examples[start : start + batch_size])
