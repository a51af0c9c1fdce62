"""Models by Hugging Face Hub id, offline from a hand-built cache; pushing with the upload stubbed; the Hub
model card (README.md) rendered from the segdiff card. Nothing here touches the network."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from conftest import CLASS_NAMES, save_tiny_model
from diffusers import DDPMScheduler
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
from huggingface_hub.utils import filter_repo_objects
from test_card import CREDIT
from test_cli import FAST_SAMPLING, TINY, guided
from test_training import write_data

import train_cli
from segdiff import SegdiffError, SegDiffPipeline, hub
from segdiff.cli import hub as hub_cli
from segdiff.hub import publish
from segdiff.model import card as hubcard
from segdiff.model.card import CARD_FILE, ModelCard
from segdiff.model.unet import build_unet
from segdiff.studio.registry import Models

ROOT = Path(__file__).resolve().parents[1]
COMMITS = {"main": "a" * 40, "v1": "b" * 40}


def cache_entry(cache: Path, repo_id: str, folder: Path, ref: str = "main") -> Path:
    """Put `folder` into a Hub cache as huggingface_hub lays it out: refs/<ref> names a snapshot folder."""
    entry = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = entry / "snapshots" / COMMITS[ref]
    shutil.copytree(folder, snapshot)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / ref).write_text(COMMITS[ref])
    return snapshot


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty Hub cache, and huggingface_hub told it is offline, as HF_HUB_CACHE and HF_HUB_OFFLINE=1 do."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def sample(pipe) -> torch.Tensor:
    mask = torch.zeros(64, 64, dtype=torch.long)
    mask[16:48, 16:48] = 1
    generator = torch.Generator().manual_seed(0)
    return pipe(mask, num_inference_steps=2, scheduler="ddim", generator=generator, output_type="pt").images


# ---- opening by id ---------------------------------------------------------------------------------------


def test_a_hub_id_opens_offline_from_the_cache(offline, tiny_model_dir):
    cache_entry(offline, "org/tiny-breast", tiny_model_dir)
    from_hub = SegDiffPipeline.from_pretrained("org/tiny-breast", device="cpu")
    local = SegDiffPipeline.from_pretrained(tiny_model_dir, device="cpu")
    assert asdict(from_hub.card) == asdict(local.card)
    assert torch.equal(sample(from_hub), sample(local))


def test_a_revision_picks_its_snapshot(offline, tiny_model_dir, tmp_path):
    renamed = save_tiny_model(tmp_path / "renamed", 64, ["background", "a", "b", "c"])
    cache_entry(offline, "org/tiny", tiny_model_dir, "main")
    cache_entry(offline, "org/tiny", renamed, "v1")
    assert SegDiffPipeline.from_pretrained("org/tiny", device="cpu").card.class_names == CLASS_NAMES
    for revision in ("v1", COMMITS["v1"]):
        pipe = SegDiffPipeline.from_pretrained("org/tiny", revision=revision, device="cpu")
        assert pipe.card.class_names == ["background", "a", "b", "c"]


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(offline, tiny_model_dir, tmp_path, monkeypatch):
    cache_entry(offline, "org/tiny", tiny_model_dir)
    save_tiny_model(tmp_path / "org" / "tiny", 64, ["background", "local", "b", "c"])
    monkeypatch.chdir(tmp_path)
    assert not hub.is_hub_id("org/tiny") and hub.model_folder("org/tiny") == Path("org/tiny")
    assert SegDiffPipeline.from_pretrained("org/tiny", device="cpu").card.class_names[1] == "local"


def test_the_studio_offers_a_hub_model_by_its_name(offline, tiny_model_dir, tmp_path):
    cache_entry(offline, "org/tiny-breast", tiny_model_dir)
    models = Models.discover(tmp_path / "no-bundled-models", "x", model="org/tiny-breast")
    assert models.names == ["tiny-breast"] and models.default == "tiny-breast"
    assert models.get().pipe.card.class_names == CLASS_NAMES


def not_a_model(cache: Path, tmp_path: Path) -> str:
    (tmp_path / "readme-only").mkdir()
    (tmp_path / "readme-only" / "README.md").write_text("a data set, not a model\n")
    cache_entry(cache, "org/readme-only", tmp_path / "readme-only")
    return "org/readme-only"


def ref_out_of_the_cache(cache: Path, tmp_path: Path) -> str:
    """A cache entry whose ref names no commit but a path out of the cache, which huggingface_hub will not
    follow (it raises a bare ValueError)."""
    entry = cache / "models--org--bad-ref"
    (entry / "snapshots").mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("../../..")
    return "org/bad-ref"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda cache, tmp: "org/missing", "org/missing: not in the Hub cache"),
        (not_a_model, "org/readme-only: not a segdiff model"),
        (ref_out_of_the_cache, "org/bad-ref: its entry in the Hub cache ({cache}) is damaged"),
        (lambda cache, tmp: "org/bad--name", "org/bad--name: no such model folder, and not a valid Hub id"),
    ],
)
def test_hub_failures_are_one_line(offline, tmp_path, make, message):
    name = make(offline, tmp_path)
    with pytest.raises(SegdiffError) as caught:
        SegDiffPipeline.from_pretrained(name, device="cpu")
    assert str(caught.value).startswith(message.format(cache=offline)) and "\n" not in str(caught.value)


def test_the_studio_exits_with_one_line_for_an_uncached_id_offline(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", "org/missing"], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"segdiff studio: org/missing: not in the Hub cache ({tmp_path}) and HF_HUB_OFFLINE is set; "
        "download it once online, or pass a model folder"
    ]


# ---- pushing ---------------------------------------------------------------------------------------------


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded, as read at upload time."""

    uploads: ClassVar[list[dict]] = []

    def __init__(self, token=None):
        self.token = token

    def whoami(self):
        return {"name": "me"}

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.private = private
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"me/{repo_id}"})()

    def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        FakeApi.uploads.append({
            "repo_id": repo_id, "private": self.private, "folder": folder,
            "files": sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns)),
            "readme": (folder / "README.md").read_text(), "card": ModelCard.load(folder),
        })  # fmt: skip
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/{'c' * 40}"})()


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.uploads = []
    monkeypatch.setattr(publish, "HfApi", FakeApi)
    return FakeApi.uploads


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_push_to_hub_uploads_the_trained_model_and_its_card(tmp_path, monkeypatch, capsys, fake_api):
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path / "data", counts=(4, 2, 2))
    flags = [*guided(["data/img", "data/mask"]), *TINY, *FAST_SAMPLING, "--max_train_steps", "2",
             "--checkpointing_steps", "1", "--output_dir", "run"]  # fmt: skip
    code = train_cli.main(["--mode", "train", *flags, "--push_to_hub", "--hub_model_id", "org/tiny",
                           "--hub_private_repo"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (upload,) = fake_api
    assert upload["repo_id"] == "org/tiny" and upload["private"] and upload["folder"] == Path("run")
    assert {"README.md", CARD_FILE, "model_index.json", "unet/config.json"} <= set(upload["files"])
    assert not [f for f in upload["files"] if f.startswith(("checkpoint-", "."))]
    assert list((tmp_path / "run").glob("checkpoint-*")), "checkpoints were written, and left behind"
    assert asdict(upload["card"]) == asdict(ModelCard.load(tmp_path / "run"))
    assert front_matter(upload["readme"])["library_name"] == "segdiff"
    assert 'SegDiffPipeline.from_pretrained("org/tiny")' in upload["readme"]
    assert "uploaded to the Hub: https://huggingface.co/org/tiny/commit/" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mode", "eval", "--push_to_hub"], "--push_to_hub with --mode eval"),
        (["--push_to_hub", "--hub_model_id", "org/a b"], "org/a b: not a valid Hub id"),
    ],
)
def test_push_flags_are_checked_before_training(tmp_path, monkeypatch, capsys, fake_api, flags, message):
    monkeypatch.chdir(tmp_path)
    assert train_cli.main(["--img_dir", "nowhere", *flags]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}") and not fake_api


def connect_error() -> Exception:
    """What huggingface_hub's HTTP library (httpx, or httpx2 under huggingface_hub 2) raises with no network."""
    http = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    error = http.ConnectError("[Errno -2] Name or service not known")
    assert not isinstance(error, OSError)  # why catching OSError alone let it through
    return error


class OfflineApi(FakeApi):
    def whoami(self):
        raise connect_error()

    def create_repo(self, repo_id, private=False, exist_ok=False):
        raise connect_error()


class NoTokenApi(FakeApi):
    def whoami(self):
        raise LocalTokenNotFoundError("Token is required to call the /whoami-v2 endpoint: none found.")


def test_pushing_without_network_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(publish, "HfApi", OfflineApi)
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    with pytest.raises(SystemExit) as exit_code:
        hub_cli.main(["push", str(folder), "org/name"])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err == (
        "error: org/name: upload to the Hugging Face Hub failed ([Errno -2] Name or service not known)\n"
    )


@pytest.mark.parametrize(
    "api, message",
    [
        (
            NoTokenApi,
            "org/tiny: pushing needs a Hugging Face token; log in with `hf auth login` or set HF_TOKEN",
        ),
        (
            OfflineApi,
            "org/tiny: the Hugging Face Hub refused or did not answer the token check ([Errno -2] Name "
            "or service not known); pushing needs the Hub online and a valid token",
        ),
    ],
    ids=["no-token", "no-network"],
)
def test_push_to_hub_checks_the_token_before_training(tmp_path, monkeypatch, capsys, api, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(publish, "HfApi", api)
    write_data(tmp_path / "data", counts=(4, 2, 2))
    flags = [*guided(["data/img", "data/mask"]), *TINY, "--max_train_steps", "2", "--output_dir", "run"]
    assert train_cli.main(["--mode", "train", *flags, "--push_to_hub", "--hub_model_id", "org/tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # refused before training began


def test_hub_push_command_names_the_repository_in_the_readme(tiny_model_dir, tmp_path, capsys, fake_api):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    hub_cli.main(["push", str(folder), "tiny-breast"])
    assert fake_api[0]["repo_id"] == "me/tiny-breast"
    assert 'from_pretrained("me/tiny-breast")' in (folder / "README.md").read_text()
    assert capsys.readouterr().out.startswith(f"uploaded {folder}: https://huggingface.co/me/tiny-breast/")
    with pytest.raises(SystemExit) as exit_code:
        hub_cli.main(["push", str(tmp_path), "org/x"])
    assert exit_code.value.code == 2
    assert (
        capsys.readouterr().err == f"error: {tmp_path}: not a segdiff model folder (no {CARD_FILE}); "
        "expected a folder train_cli.py or SegDiffPipeline.save_pretrained wrote\n"
    )


# ---- the model card --------------------------------------------------------------------------------------


def test_the_readme_front_matter_and_text_follow_the_card(tmp_path):
    card = ModelCard(num_classes=3, img_channels=1, img_size=16, class_names=["background", "pubic symphysis",
                     "fetal head"], colors=[[0, 0, 0], [1, 2, 3], [4, 5, 6]], dataset=CREDIT,
                     training={"command": "train_cli.py --mode train", "steps": 10},
                     quality={"runs": {"dpm++ 12": {"mean_dice": 0.875, "dice": {"fetal head": 0.8125}}}})  # fmt: skip
    SegDiffPipeline(build_unet("tiny", 16, 1, card.cond_channels), DDPMScheduler(), card).save_pretrained(
        tmp_path
    )
    readme = (tmp_path / "README.md").read_text()
    assert front_matter(readme) == {
        "license": "cc-by-4.0", "library_name": "segdiff", "pipeline_tag": "image-to-image", "tags": hubcard.TAGS,
    }  # fmt: skip
    for i, name in enumerate(card.class_names):
        assert f"| {i} | {name} | `{card.palette.hex(i)}` |" in readme
    for fact in ("train_cli.py --mode train", CREDIT["citation"], CREDIT["license"], "0.875", "0.8125"):
        assert fact in readme, fact
    assert "FRD" not in readme  # realism columns only where a run measured them
    card.quality["runs"]["student 2"] = {"realism": {"frd": 8.07, "baseline_frd": 5.37, "classifier": 0.75}}
    card.save(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert "| FRD (real vs real) | classifier accuracy (real vs real) |" in readme
    assert "| 8.07 (5.37) | 0.75 (?) |" in readme and readme.count("| dpm++ 12 |") == 1
    card.class_names[2] = "head"
    card.dataset = {**CREDIT, "license": "CC BY-NC-SA 4.0", "hub_id": "org/psfhs"}
    card.save(tmp_path)  # any later save of the card rewrites the README
    readme = (tmp_path / "README.md").read_text()
    assert "| 2 | head |" in readme and front_matter(readme)["license"] == "cc-by-nc-sa-4.0"
    assert front_matter(readme)["datasets"] == ["org/psfhs"]


def test_unconditional_models_and_unknown_licences(tmp_path):
    card = ModelCard(
        num_classes=0, img_channels=3, img_size=16, encoding="none", dataset={"license": "ask us"}
    )
    card.save(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert front_matter(readme)["pipeline_tag"] == "unconditional-image-generation"
    assert front_matter(readme)["license"] == "other" and "## Classes" not in readme


@pytest.mark.parametrize("folder", sorted((ROOT / "assets" / "models").iterdir()), ids=lambda p: p.name)
def test_bundled_models_carry_their_current_readme(folder):
    assert (folder / "README.md").read_text() == hubcard.render(ModelCard.load(folder))
