"""`--hf-path` as a local folder or a Hugging Face Hub repo id (downloaded with huggingface_hub when installed)."""

from __future__ import annotations

import re
from pathlib import Path

from mlx_gemma3.errors import Gemma3Error

# What a conversion reads: config, weights, tokenizer and chat template; never *.bin, *.gguf or images.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def resolve_hf_path(value: str) -> Path:
    """The local folder `value` names, or the snapshot folder of the Hub repo `owner/name`."""
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise Gemma3Error(f"input {value} is a file, not a model folder: pass the folder that holds config.json")
    if not is_repo_id(value):
        raise Gemma3Error(f"input folder {value} does not exist")
    return Path(download(value))


def is_repo_id(value: str) -> bool:
    """`owner/name` as the Hub spells repo ids (no `..` or `--`, at most 96 characters a part)."""
    return bool(REPO_ID.fullmatch(value)) and ".." not in value and "--" not in value


def download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise Gemma3Error(
            f"no local folder {repo_id}; to download it from the Hugging Face Hub: pip install huggingface_hub"
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
