"""Publishing: the folder and model card that would go to the Hub (no machine here reaches it)."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from evaluation.evaluate import run
from evaluation.publish import main, prepare_folder, upload
from tests.evaluation.conftest import SMALL_SUITE
from training.adapter import META_NAME, WEIGHTS_NAME, verify_adapter

pytestmark = pytest.mark.slow


@pytest.fixture
def champion(eval_config, toy_adapters, mlflow_server):
    on = [f"mlflow.tracking_uri={mlflow_server}", "mlflow.enabled=true", "registry.enabled=true"]
    cfg = eval_config(*SMALL_SUITE, *on, "registry.model_name=pub", "gate.checks={success_rate: {min: 0.95}}")
    result = run(cfg, str(toy_adapters["good"]))
    assert result.passed
    return "models:/pub@champion", result


def test_the_folder_holds_the_verified_adapter_samples_and_a_model_card(champion, mlflow_server, tmp_path):
    ref, result = champion
    out = prepare_folder(ref, tmp_path / "pub", "someone/toy-sks-lora", mlflow_server)
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", META_NAME, "samples.png", WEIGHTS_NAME])
    assert verify_adapter(out).sha256 == result.adapter["sha256"]  # the files the card describes, unchanged
    with Image.open(out / "samples.png") as grid:
        assert grid.size == (4 * 64, 2 * 64)  # the QA grid: base above, adapter below

    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and "lora" in data["tags"] and data["instance_prompt"] == "sks"
    assert "base_model" not in data  # the toy base model is local, not a Hub id
    assert data["widget"][0]["text"] == "a red circle on a sks background"
    text = card.text
    assert 'pipe.load_lora_weights("someone/toy-sks-lora")' in text and "`toy-sd`" in text
    assert f"| clip_t | {result.metrics['clip_t']:.4g} |" in text and "| rank | 8 |" in text
    assert "promotion gate: **passed**" in text and "models:/pub/1" in text


def test_upload_is_one_folder_push_to_the_named_repo(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw["exist_ok"], kw["private"]))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw["folder_path"], kw["repo_type"]))
            return "https://huggingface.co/someone/x/commit/1"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert upload(tmp_path, "someone/x", token="t", private=True) == "https://huggingface.co/someone/x/commit/1"
    assert calls == [
        ("init", "t"),
        ("create_repo", "someone/x", True, True),
        ("upload_folder", "someone/x", str(tmp_path), "model"),
    ]


def test_cli_writes_locally_by_default_and_pushes_only_when_asked(champion, mlflow_server, tmp_path, capsys):
    ref, _ = champion
    args = [ref, "--tracking-uri", mlflow_server, "--out", str(tmp_path / "dry")]
    assert main([*args, "--repo-id", "someone/toy"]) == 0  # the default stays on this machine
    out = capsys.readouterr().out
    assert "README.md" in out and "not uploaded (add --push" in out
    assert main([*args, "--repo-id", "someone/toy"]) == 2  # the folder exists: nothing overwritten
    assert "not empty" in capsys.readouterr().err
    assert main([ref, "--repo-id", "no-slash"]) == 2
    assert "must be <user or org>/<name>" in capsys.readouterr().err
    # offline: the upload fails with what to do, and the folder stays
    up = [ref, "--tracking-uri", mlflow_server, "--out", str(tmp_path / "up"), "--repo-id", "someone/t", "--push"]
    assert main(up) == 1
    err = capsys.readouterr().err
    assert "upload to someone/t failed" in err and "the folder is kept at" in err
    assert (tmp_path / "up" / WEIGHTS_NAME).is_file()
