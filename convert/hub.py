"""`--hf-path` as a local folder or a Hugging Face Hub repo id (downloaded with huggingface_hub when installed).

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from pathlib import Path

from mlx_gemma3.errors import Gemma3Error
from mlx_gemma3.model.sources import hub_snapshot, is_repo_id


def resolve_hf_path(value: str) -> Path:
    """The local folder `value` names, or the snapshot folder of the Hub repo `owner/name`."""
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise Gemma3Error(f"input {value} is a file, not a model folder: pass the folder that holds config.json")
    if not is_repo_id(value):
        raise Gemma3Error(f"input folder {value} does not exist")
    return Path(hub_snapshot(value))
