"""Publishing a model folder on the Hugging Face Hub under an id `org/name`.

Pushing writes the model card (README.md) naming the repository, then uploads the folder, leaving training
checkpoints and hidden files behind. The command line is `python -m segdiff.hub push`.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError, LocalTokenNotFoundError
from huggingface_hub.utils import validate_repo_id

from ..errors import HubError
from ..model.card import CARD_FILE, ModelCard, write_readme
from ..resolve import HUB_FAILURES, first_line

# Left out of uploads: training checkpoints (optimizer state, several times the model) and interrupted saves.
NOT_UPLOADED = ["checkpoint-*", "checkpoint-*/**", ".*", "**/.*"]



def check_repo_id(repo_id: str) -> str:
    """`repo_id` when it can name a Hub repository (`org/name`, or `name` in the user's own namespace)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{repo_id}: not a valid Hub id, expected org/name ({e})") from e
    return repo_id


def check_push(repo_id: str, token: str | None = None) -> str:
    """`repo_id` when it is a valid id and the Hub answers to a token (`token`, else HF_TOKEN or `hf auth
    login`): checked before a long run that pushes at its end, not after."""
    check_repo_id(repo_id)
    try:
        HfApi(token=token).whoami()
    except LocalTokenNotFoundError as e:
        raise HubError(
            f"{repo_id}: pushing needs a Hugging Face token; log in with `hf auth login` or set HF_TOKEN"
        ) from e
    except HUB_FAILURES as e:
        raise HubError(
            f"{repo_id}: the Hugging Face Hub refused or did not answer the token check ({first_line(e)}); pushing "
            "needs the Hub online and a valid token (`hf auth login` or HF_TOKEN)"
        ) from e
    return repo_id


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
        write_readme(folder, ModelCard.load(folder), repo_id)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=message or f"Upload segdiff model {folder.name}",
            ignore_patterns=NOT_UPLOADED,
        )
    except HUB_FAILURES as e:  # HTTP errors (no permission, no token: `hf auth login`) and network failures
        raise HubError(f"{repo_id}: upload to the Hugging Face Hub failed ({first_line(e)})") from e
    return commit.commit_url
