"""The model card travels with the model: a save and reopen keeps every field, the data credit included."""

from dataclasses import asdict

import pytest
from diffusers import DDPMScheduler

from segdiff import SegDiffPipeline
from segdiff.errors import CheckpointError
from segdiff.model.card import ModelCard
from segdiff.model.unet import build_unet

CREDIT = {
    "name": "PSFHS intrapartum ultrasound",
    "source": "doi:10.5281/zenodo.10969427",
    "license": "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)",
    "citation": "Chen G, Bai J, Ou Z, Lu Y, Wang H. Scientific Data 11, 436 (2024)",
    "changes": "PNG, greyscale, re-split by examination, downsampled",
}


def test_a_saved_model_keeps_its_data_credit_and_classes(tmp_path):
    card = ModelCard(num_classes=3, img_channels=1, img_size=16, class_names=["background", "pubic symphysis",
                     "fetal head"], colors=[[0, 0, 0], [1, 2, 3], [4, 5, 6]], dataset=CREDIT)  # fmt: skip
    SegDiffPipeline(build_unet("tiny", 16, 1, card.cond_channels), DDPMScheduler(), card).save_pretrained(tmp_path)
    reopened = SegDiffPipeline.from_pretrained(tmp_path, device="cpu").card
    assert asdict(reopened) == asdict(card)
    assert reopened.dataset["license"].startswith("CC BY 4.0") and reopened.palette.hex(2) == "#040506"


def test_cards_written_before_the_credit_field_still_open(tmp_path):
    card = ModelCard(num_classes=2, img_channels=1, img_size=16)
    card.save(tmp_path)
    text = (tmp_path / "segdiff_card.json").read_text().replace("\"dataset\": {},", "")
    (tmp_path / "segdiff_card.json").write_text(text)
    assert "dataset" not in text and ModelCard.load(tmp_path).dataset == {}


def test_a_recorded_sampling_survives_a_save_and_its_readme_names_it(tmp_path):
    card = ModelCard(num_classes=3, img_channels=1, img_size=32, sampling={"sampler": "ddpm", "steps": 20})
    card.save(tmp_path)
    loaded = ModelCard.load(tmp_path)
    assert (loaded.generation.sampler, loaded.generation.steps) == ("ddpm", 20)
    assert 'pipe(mask, sampler="ddpm", num_inference_steps=20)' in (tmp_path / "README.md").read_text()
    assert ModelCard(num_classes=3, img_channels=1, img_size=32).generation is None
    for bad in ({"sampler": "euler", "steps": 20}, {"sampler": "ddpm", "steps": True}, {"sampler": "ddpm"},
                {"sampler": "ddpm", "steps": 20, "guidance_scale": 0.5},
                {"sampler": "ddpm", "steps": 20, "guidance_scale": True}):  # fmt: skip
        with pytest.raises(CheckpointError, match=r"sampling"):
            ModelCard(num_classes=3, img_channels=1, img_size=32, sampling=bad)


def test_a_recorded_sampling_may_name_the_student_and_its_mask_guidance(tmp_path):
    student = {"steps": 2, "teacher_steps": 8}
    chosen = {"sampler": "student", "steps": 2, "guidance_scale": 2}
    card = ModelCard(num_classes=3, img_channels=1, img_size=32, student=student, sampling=chosen)
    card.save(tmp_path)
    loaded = ModelCard.load(tmp_path).generation
    assert (loaded.sampler, loaded.steps, loaded.guidance_scale) == ("student", 2, 2)
    assert "`pipe(mask, guidance_scale=2)`, where the studio's Generate starts" in (tmp_path / "README.md").read_text()
    with pytest.raises(CheckpointError, match=r"sampling .* names the student, and the model has none"):
        ModelCard(num_classes=3, img_channels=1, img_size=32, sampling=chosen)
