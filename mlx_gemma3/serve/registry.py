"""The models one server serves, by name: chat, embedding and draft models, loaded on first use and evicted least
recently used beyond a number of loaded models or a byte budget (a model in use is never evicted).

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mlx.utils import tree_flatten

from ..errors import Gemma3Error
from ..model.config import load_config
from ..processing.prompt import find_chat_template, is_base_model
from .worker import Worker

KINDS = ("chat", "embedding", "draft")  # a draft model is never asked for by name: its chat models use it
HOW_TO_SERVE = {
    "chat": "start the server with --model MODEL",
    "embedding": "start the server with --embedding-model MODEL (an EmbeddingGemma folder)",
    "draft": "start the server with --draft-model MODEL",
}


class UnknownModel(LookupError):
    """No model of the kind asked for goes by this name."""

    def __init__(self, name: str, kind: str, known: list[str]):
        served = f"{kind} models: {', '.join(known)}" if known else f"no {kind} model: {HOW_TO_SERVE[kind]}"
        super().__init__(f"the model {name!r} is not served here; {served}")
        self.name = name


@dataclass(frozen=True)
class ModelSpec:
    """A model the server can serve: its name, where it loads from (a folder, a .gguf file, a Hub repo id), its
    kind and (a chat model) the name of the draft model that speeds it up."""

    name: str
    source: str
    kind: str = "chat"
    draft: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """Names are per kind: a chat model and an embedding model may go by one name."""
        return (self.kind, self.name)


@dataclass
class Served:
    """A loaded model: its processor, its worker (the thread that runs it; None for a draft model) and the options
    every request to it adds (a draft model for speculative decoding)."""

    spec: ModelSpec
    model: object
    processor: object
    worker: Worker | None
    nbytes: int
    options: dict = field(default_factory=dict)
    users: int = 0  # requests (and chat models, for a draft) using it now

    @property
    def name(self) -> str:
        return self.spec.name


def model_bytes(model) -> int:
    """The bytes of a loaded model's parameters (an embedding model's: those of its network, `.model`)."""
    module = model if hasattr(model, "parameters") else getattr(model, "model", None)
    return 0 if module is None else sum(array.nbytes for _, array in tree_flatten(module.parameters()))


def source_bytes(source: str) -> int:
    """The bytes a model's weights take on disk (a folder's safetensors, a .gguf file): what loading it is
    expected to take (0 when not known yet: a Hub repo not downloaded)."""
    path = Path(source) if source else None
    if path is not None and path.is_file():
        return path.stat().st_size
    if path is not None and path.is_dir():
        return sum(weights.stat().st_size for weights in path.glob("*.safetensors"))
    return 0


class Registry:
    """Models by name. `load(spec)` gives (model, processor); `start(model, processor)` the Worker that will run
    it (a chat model's generations, an embedding model's calls). At most `max_loaded` models (0: no bound) of at
    most `max_bytes` together (0: no bound) stay loaded; the least recently used that no request holds go first.
    With one model of a kind, every name asks for it. `log` gets a line when a model loads or leaves."""

    def __init__(
        self,
        specs: list[ModelSpec],
        load: Callable[[ModelSpec], tuple[object, object]],
        start: Callable[[object, object], Worker],
        max_loaded: int = 0,
        max_bytes: int = 0,
        log: Callable[[str], None] = lambda line: None,
    ):
        self.specs = {spec.key: spec for spec in specs}
        self.load_model, self.start, self.max_loaded, self.max_bytes = load, start, max_loaded, max_bytes
        self.log = log
        self.loaded: OrderedDict[tuple[str, str], Served] = OrderedDict()  # by ModelSpec.key, least recently used first
        self.lock = threading.RLock()

    def listed(self) -> list[ModelSpec]:
        """What requests may ask for: the chat and embedding models."""
        return [spec for spec in self.specs.values() if spec.kind != "draft"]

    def reads_images(self, spec: ModelSpec) -> bool | None:
        """Whether a chat model reads images: from the loaded model, else from its folder's config (None when
        neither is at hand: a .gguf file or a Hub repo not loaded yet)."""
        served = self.loaded.get(spec.key)
        if served is not None:
            return served.model.config.vision is not None
        if not (Path(spec.source) / "config.json").is_file():
            return None
        try:
            return load_config(spec.source).vision is not None
        except Gemma3Error:
            return None

    def is_base_model(self, spec: ModelSpec) -> bool | None:
        """Whether a chat model is a base model (no chat template): from the loaded model, else from its folder
        (None when neither is at hand)."""
        served = self.loaded.get(spec.key)
        if served is not None:
            return is_base_model(served.processor)
        if not (Path(spec.source) / "config.json").is_file():
            return None
        try:
            return find_chat_template(spec.source) is None
        except Gemma3Error:
            return None

    def resolve(self, name: str | None, kind: str = "chat") -> ModelSpec:
        """The spec a request's `model` names; any name (or none) gives the one model of a kind when there is one,
        no name the first; raises UnknownModel."""
        of_kind = [spec for spec in self.specs.values() if spec.kind == kind]
        spec = self.specs.get((kind, name)) if name is not None else (of_kind[0] if of_kind else None)
        if spec is not None:
            return spec
        if len(of_kind) == 1:
            return of_kind[0]
        raise UnknownModel(str(name), kind, [spec.name for spec in of_kind])

    @contextmanager
    def use(self, name: str | None, kind: str = "chat") -> Iterator[Served]:
        """The loaded model a request asks for, held (never evicted) until the block ends."""
        with self.lock:
            served = self.acquire(self.resolve(name, kind))
        try:
            yield served
        finally:
            with self.lock:
                served.users -= 1

    def preload(self, name: str | None = None, kind: str = "chat") -> Served:
        """Load a model now, unannounced (the server's first model, so that its errors show at start)."""
        with self.lock:
            served = self.acquire(self.resolve(name, kind), announce=False)
            served.users -= 1
            return served

    def add(self, spec: ModelSpec, model, processor) -> Served:
        """Register a model loaded elsewhere (a server made around one model)."""
        with self.lock:
            self.specs[spec.key] = spec
            served = Served(spec, model, processor, self.start(model, processor), model_bytes(model))
            self.loaded[spec.key] = served
            return served

    def acquire(self, spec: ModelSpec, announce: bool = True) -> Served:
        served = self.loaded.get(spec.key)
        if served is None:
            self.make_room(source_bytes(spec.source), 1)
            served = self.load(spec)
            self.loaded[spec.key] = served
            if announce:
                self.log(f"loaded {spec.kind} model {spec.name} ({served.nbytes / 1e6:.1f} MB)")
        self.loaded.move_to_end(spec.key)
        served.users += 1
        self.make_room(0, 0)  # what loading took, measured
        return served

    def load(self, spec: ModelSpec) -> Served:
        model, processor = self.load_model(spec)
        options = {}
        if spec.draft is not None:
            draft = self.acquire(self.specs[("draft", spec.draft)])  # held while this model stays loaded
            options = {"draft_model": draft.model}
        worker = None if spec.kind == "draft" else self.start(model, processor)  # a draft runs on its model's
        return Served(spec, model, processor, worker, model_bytes(model), options)

    def make_room(self, incoming: int, joining: int) -> None:
        """Evict the least recently used models nothing holds until `joining` more models of `incoming` more bytes
        fit (the models in use stay, over the bounds if need be)."""
        for key in list(self.loaded):
            if self.fits(incoming, joining):
                return
            if self.loaded[key].users == 0:
                self.evict(key)

    def fits(self, incoming: int, joining: int) -> bool:
        count_ok = not self.max_loaded or len(self.loaded) + joining <= self.max_loaded
        bytes_ok = not self.max_bytes or self.nbytes + incoming <= self.max_bytes
        return count_ok and bytes_ok

    def evict(self, key: tuple[str, str]) -> None:
        served = self.loaded.pop(key)
        self.log(f"unloaded {served.spec.kind} model {served.name} (least recently used, to make room)")
        if served.worker is not None:
            served.worker.stop()
        draft = ("draft", served.spec.draft)
        if served.spec.draft is not None and draft in self.loaded:
            self.loaded[draft].users -= 1

    @property
    def nbytes(self) -> int:
        return sum(served.nbytes for served in self.loaded.values())

    def close(self) -> None:
        with self.lock:
            for served in self.loaded.values():
                if served.worker is not None:
                    served.worker.stop()
            self.loaded.clear()
