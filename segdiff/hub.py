"""Models on the Hugging Face Hub: open one by its id `org/name`, publish a model folder under one.

    python -m segdiff.hub push MODEL_DIR org/name [--private] [--message TEXT]

Wherever segdiff takes a model (`SegDiffPipeline.from_pretrained`, `app.py --model`, `train_cli.py
--model_dir`, `segdiff.volumes synthesize`) it takes a folder or a Hub id. A folder that exists wins;
otherwise a name of the form `org/name` is fetched through huggingface_hub's cache (HF_HOME, HF_HUB_CACHE),
downloaded once and opened from there, as diffusers pipelines are; with HF_HUB_OFFLINE=1 it opens from the
cache alone. Pushing writes the model card (README.md) naming the repository, then uploads the folder.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from . import hubcard
from .errors import HubError, SegdiffError
from .models import CARD_FILE, ModelCard

# `org/name`: a local path that does not exist reads differently ("./x", "/x", "a/b/c", "x").
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Every model folder segdiff opens holds this file: segdiff models, original run folders, released checkpoints.
MARKER = "unet/config.json"
# Left out of uploads: training checkpoints (optimizer state, several times the model) and interrupted saves.
NOT_UPLOADED = ["checkpoint-*", "checkpoint-*/**", ".*", "**/.*"]


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name` names a Hub model: `org/name` where no such file or folder exists."""
    text = os.fspath(name)
    return HUB_ID.fullmatch(text) is not None and not os.path.exists(text)


def model_folder(
    name: str | os.PathLike,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local folder holding model `name`: `name` itself, or the Hub snapshot of id `name`.

    `revision` (a branch, tag or commit; default main) picks the snapshot; it is downloaded into the Hub
    cache unless there already. Errors are one `HubError` line: no such id or revision, a repository that
    holds no model, not cached while offline.
    """
    if not is_hub_id(name):
        return Path(name)
    repo_id = os.fspath(name)
    shown = f"{repo_id} (revision {revision})" if revision else repo_id
    options = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    try:
        validate_repo_id(repo_id)
        # One small file first: a repository that is not a model is told apart before a large download.
        hf_hub_download(repo_id, MARKER, **options)
        return Path(snapshot_download(repo_id, **options))
    except HFValidationError as e:
        raise HubError(f"{repo_id}: no such model folder, and not a valid Hub id ({e})") from e
    except GatedRepoError as e:
        raise HubError(
            f"{shown}: a gated Hub repository; accept its terms on the Hub, then `hf auth login`"
        ) from e
    except RepositoryNotFoundError as e:
        raise HubError(
            f"{repo_id}: no such model folder, and no such model on the Hugging Face Hub "
            "(a private one needs `hf auth login` or HF_TOKEN)"
        ) from e
    except RevisionNotFoundError as e:
        raise HubError(f"{repo_id}: no revision {revision!r} on the Hugging Face Hub") from e
    except RemoteEntryNotFoundError as e:
        raise HubError(f"{shown}: not a segdiff model (the Hub repository holds no {MARKER})") from e
    except LocalEntryNotFoundError as e:
        if _cached(repo_id, revision, cache_dir):
            raise HubError(f"{shown}: not a segdiff model (its cached snapshot holds no {MARKER})") from e
        why = (
            "HF_HUB_OFFLINE is set"
            if constants.HF_HUB_OFFLINE or local_files_only
            else "the Hub is unreachable"
        )
        raise HubError(
            f"{shown}: not in the Hub cache ({cache_dir or constants.HF_HUB_CACHE}) and {why}; "
            "download it once online, or pass a model folder"
        ) from e
    except OSError as e:  # HTTP errors and network failures other than those above
        raise HubError(f"{shown}: the Hugging Face Hub download failed ({_first_line(e)})") from e


def check_repo_id(repo_id: str) -> str:
    """`repo_id` when it can name a Hub repository (`org/name`, or `name` in the user's own namespace)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{repo_id}: not a valid Hub id, expected org/name ({e})") from e
    return repo_id


def _cached(repo_id: str, revision: str | None, cache_dir) -> bool:
    try:
        snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except (OSError, ValueError):
        return False
    return True


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    message: str | None = None,
) -> str:
    """Upload model folder `folder` to Hub repository `repo_id` (created when missing: `private` then; a bare
    `name` lands in the namespace of the token's user).

    README.md is written first from the folder's card, naming `repo_id` in its usage example, so the Hub
    page shows the card. Training checkpoints and hidden files stay behind. Returns the commit's URL.
    """
    folder = Path(folder)
    if not (folder / CARD_FILE).is_file():
        raise HubError(f"{folder}: not a segdiff model folder (no {CARD_FILE}); expected a folder train_cli.py "
                       "or SegDiffPipeline.save_pretrained wrote")  # fmt: skip
    check_repo_id(repo_id)
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(
            repo_id, private=private, exist_ok=True
        ).repo_id  # `name` gains the user's org
        hubcard.write(folder, ModelCard.load(folder), repo_id)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=message or f"Upload segdiff model {folder.name}",
            ignore_patterns=NOT_UPLOADED,
        )
    except OSError as e:  # HTTP errors (no permission, no token: `hf auth login`) and network failures
        raise HubError(f"{repo_id}: upload to the Hugging Face Hub failed ({_first_line(e)})") from e
    return commit.commit_url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m segdiff.hub", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser(
        "push", help="upload a model folder to the Hub, with its model card as README.md"
    )
    up.add_argument("model_dir", help="a segdiff model folder (holding segdiff_card.json)")
    up.add_argument("repo_id", help="the Hub repository, org/name (created when missing)")
    up.add_argument("--private", action="store_true", help="create the repository private")
    up.add_argument("--message", help="the commit message")
    args = parser.parse_args(argv)
    try:
        print(
            f"uploaded {args.model_dir}: {push(args.model_dir, args.repo_id, private=args.private, message=args.message)}"
        )
    except SegdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
