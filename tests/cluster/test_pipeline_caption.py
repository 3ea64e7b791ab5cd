"""The pipeline's caption stage, without a cluster: a folder of images without captions is captioned in place by the
captioner the config picks (toy for the toy base model, through the real toy CLIP), the dataset then validates,
and images that had a caption keep it; the settings it refuses name their key."""

from __future__ import annotations

import json
import shutil

import pytest

from cluster.config import PipelineConfig
from cluster.pipeline import Pipeline
from training.configuration import ConfigError, load_config


@pytest.fixture
def uncaptioned(toy_dataset, tmp_path):
    """The toy dataset's 8 images without metadata.jsonl (what an upload of bare images holds), and the captions
    its generator wrote (trigger 'sks' = the dotted background)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = [json.loads(line) for line in (toy_dataset / "metadata.jsonl").read_text().splitlines()]
    for r in rows:
        shutil.copy(toy_dataset / r["file_name"], folder / r["file_name"])
    return folder, {r["file_name"]: r["text"] for r in rows}


def pipeline(repo, tmp_path, *overrides: str) -> Pipeline:
    cfg = load_config(PipelineConfig, repo / "configs" / "pipeline.yaml", [f"output_dir={tmp_path / 'runs'}",
                      *overrides])  # fmt: skip
    return Pipeline(cfg)


def test_images_without_captions_get_the_toy_captioners_captions_and_then_validate(repo, tmp_path, uncaptioned):
    from training.config import DataConfig
    from training.data import validate_dataset

    folder, truth = uncaptioned
    p = pipeline(repo, tmp_path, f"dataset={folder}", "trigger=sks", "caption.enabled=true")
    ccfg = p.caption_config(p.tune_config())
    assert ccfg.resolved_captioner() == "toy" and ccfg.model == str(repo / "models" / "toy-clip")
    assert ccfg.trigger == "sks"
    out = p.caption(ccfg)
    assert (out["captioner"], out["captioned"], out["kept"], out["format"]) == ("toy", 8, 0, "metadata")
    assert out["model"] == "models/toy-clip"  # the checkout's model, named without the server's path
    assert {r["file"]: r["caption"] for r in out["captions"]} == truth  # every caption recovered, with the trigger
    assert p.derived["captions"] == out["captions"]  # the validate stage writes them into dataset.json
    report = validate_dataset(DataConfig(path=str(folder), trigger="sks"))
    assert not report.errors and len(report.instances) == 8

    # a rerun (or a dataset that came with captions) keeps every caption: the stage is skipped
    again = p.caption(ccfg)
    assert again["skipped"] and (again["captioned"], again["kept"]) == (0, 8)


def test_the_caption_stage_needs_a_trigger_a_local_folder_and_valid_settings(repo, tmp_path, uncaptioned):
    folder, _ = uncaptioned
    p = pipeline(repo, tmp_path, f"dataset={folder}", "caption.enabled=true")
    with pytest.raises(ConfigError, match=r"caption.enabled=true needs trigger=<word>"):
        p.caption_config(p.tune_config())
    p = pipeline(repo, tmp_path, "dataset=s3://bucket/photos", "trigger=sks", "caption.enabled=true")
    with pytest.raises(ConfigError, match="captions a local folder, not s3://bucket/photos"):
        p.caption_config(p.tune_config())
    p = pipeline(repo, tmp_path, f"dataset={folder}", "trigger=sks", "caption.template='{caption} by {artist}'")
    with pytest.raises(ConfigError, match=r"caption.template.*unknown field"):
        p.caption_config(p.tune_config())
    # a hub base model gets BLIP (loaded only when the stage runs)
    p = pipeline(repo, tmp_path, f"dataset={folder}", "trigger=sks", "caption.enabled=true",
                 'tune.overrides=["trial.base_model=stable-diffusion-v1-5/stable-diffusion-v1-5"]')  # fmt: skip
    ccfg = p.caption_config(p.tune_config())
    assert ccfg.resolved_captioner() == "blip" and ccfg.model == "Salesforce/blip-image-captioning-base"
