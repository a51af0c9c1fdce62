"""Where a named model lies: a folder, or the Hugging Face Hub snapshot of id `org/name`.

Wherever segdiff takes a model (`SegDiffPipeline.from_pretrained`, `app.py --model`, `train_cli.py
--model_dir`, `segdiff.volumes synthesize`) it takes a folder or a Hub id. A folder that exists wins;
otherwise a name of the form `org/name` is fetched through huggingface_hub's cache (HF_HOME, HF_HUB_CACHE),
downloaded once and opened from there, as diffusers pipelines are; with HF_HUB_OFFLINE=1 it opens from the
cache alone. Nothing is downloaded unless a Hub id is named.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .errors import HubError

# `org/name`: a local path that does not exist reads differently ("./x", "/x", "a/b/c", "x").
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Every model folder segdiff opens holds this file: segdiff models, original run folders, released checkpoints.
MARKER = "unet/config.json"
# What a failed Hub call raises: OSErrors, and the errors of huggingface_hub's HTTP library (httpx, or httpx2
# from huggingface_hub 2), whose network failures (ConnectError, timeouts) are not OSErrors.
HUB_FAILURES = tuple({OSError, *HfHubHTTPError.__bases__})

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
    except HUB_FAILURES as e:  # HTTP errors and network failures other than those above
        raise HubError(f"{shown}: the Hugging Face Hub download failed ({first_line(e)})") from e
    except ValueError as e:  # a cache entry huggingface_hub will not follow, e.g. a ref naming "../.."
        raise HubError(
            f"{shown}: its entry in the Hub cache ({cache_dir or constants.HF_HUB_CACHE}) is damaged "
            f"({first_line(e)}); remove it and download the model again"
        ) from e


def _cached(repo_id: str, revision: str | None, cache_dir) -> bool:
    try:
        snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except (OSError, ValueError):
        return False
    return True


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
