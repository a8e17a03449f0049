"""`--upload-repo`: push an adapter, a converted adapter or a fused model to the Hugging Face Hub.

The files are chosen here, explicitly (an adapter directory sends its adapter and card,
never the optimizer state or numbered checkpoints), and sent in one commit with
`huggingface_hub`'s own `create_repo(exist_ok=True)` + `create_commit`, which authenticate
as the `hf` CLI does (HF_TOKEN or `hf auth login`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .card import CARD
from .errors import ConfigError, MissingFileError

ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors", CARD)


def add_upload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upload-repo", default=None,
                        help="Upload the result to this Hugging Face repo (created if missing), e.g. user/name.")
    parser.add_argument("--upload-private", action="store_true", help="Create the repo as private.")


def adapter_files(adapter_dir) -> list[str]:
    """What an adapter directory publishes: its config, weights and card."""
    adapter_dir = Path(adapter_dir)
    return [f for f in ADAPTER_FILES if (adapter_dir / f).is_file()]


def folder_files(folder) -> list[str]:
    """Every regular file under `folder` (relative, sorted), hidden files and folders excluded."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def staged_operations(folder, files=None) -> list:
    """The `CommitOperationAdd`s an upload sends: exactly `files` (default: `folder_files`)."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: directory not found")
    files = folder_files(folder) if files is None else list(files)
    if not files:
        raise ConfigError(f"{folder}: nothing to upload")
    for f in files:
        if not (folder / f).is_file():
            raise MissingFileError(f"{folder / f}: file not found")
    return [CommitOperationAdd(path_in_repo=Path(f).as_posix(), path_or_fileobj=str(folder / f)) for f in files]


def upload_folder(folder, repo_id: str, files=None, private: bool = False, token=None,
                  commit_message: str | None = None, log=print) -> str:
    """Create `repo_id` if needed and commit `files` of `folder` to it; returns the repo URL."""
    from huggingface_hub import HfApi

    operations = staged_operations(folder, files)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.create_commit(repo_id, operations, repo_type="model",
                          commit_message=commit_message or f"Upload {Path(folder).name} with smoa-mlx")
    except Exception as e:  # HTTP, auth or connection errors, whichever library raised them
        raise ConfigError(f"upload of {folder} to {repo_id} failed: {str(e).splitlines()[0]}") from None
    url = str(url)
    log(f"uploaded {len(operations)} files of {folder} to {url}")
    return url
