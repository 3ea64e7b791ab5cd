"""The adapter file format: what any diffusers user loads, and what lorafleet refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.adapter import META_NAME, WEIGHTS_NAME, AdapterError, load_adapter, verify_adapter
from training.data import validate_dataset
from training.families import load_pipeline
from training.sampling import generate
from training.worker import ADAPTER_DIR, WorkerSpec, adapter_meta, run_worker, write_checkpoint

PROMPTS = ["a red circle on a sks background", "a blue square on a black background"]


def _images(pipe):
    return np.stack([np.asarray(im, dtype=np.float32) for im in generate(pipe, PROMPTS, seed=3, steps=8)])


@pytest.fixture
def trained(train_config, tmp_path):
    """Train briefly with alpha != rank (the scale must survive the round trip) and save the adapter."""
    cfg = train_config(**{"train.epochs": 3, "lora.rank": 4, "lora.alpha": 8, "train.lr": 5e-3})
    report = validate_dataset(cfg.data)
    spec = WorkerSpec(cfg, report.examples, report.fingerprint())
    parts, state = run_worker(spec)
    write_checkpoint(tmp_path / "ckpt", parts, state, adapter_meta(spec, state))
    return cfg, parts, tmp_path / "ckpt" / ADAPTER_DIR


def test_plain_diffusers_load_reproduces_the_trained_unet(trained):
    cfg, parts, adapter = trained
    in_memory = _images(parts.pipe)
    pipe = load_pipeline(cfg.base_model, device="cpu")
    base = _images(pipe)
    pipe.load_lora_weights(str(adapter))  # what any diffusers user does
    loaded = _images(pipe)
    assert np.abs(loaded - in_memory).max() <= 1.0  # ≤ 1 grey level of 255 (tight)
    assert np.abs(loaded - base).mean() > 2.0  # and the adapter really changes the images


def test_metadata_names_the_adapter(trained):
    cfg, _, adapter = trained
    meta = verify_adapter(adapter)
    assert (meta.rank, meta.alpha, meta.trigger, meta.base_model) == (4, 8, "sks", "models/toy-sd")  # portable
    assert meta.target_modules == sorted(["to_q", "to_k", "to_v", "to_out.0"])  # sorted: the same bytes every time
    assert len(meta.dataset_hash) == 64 and meta.training["step"] == 6
    keys = load_file(str(adapter / WEIGHTS_NAME)).keys()
    assert keys and all(k.startswith("unet.") for k in keys)


def test_tampered_weights_are_refused(trained):
    _, _, adapter = trained
    weights = adapter / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="sha256"):
        verify_adapter(adapter)


def test_a_checkpoint_whose_trainer_state_was_cut_short_is_not_complete(trained, tmp_path):
    """A copy that hit a full disk after the adapter leaves a non-empty, truncated trainer_state.pt; whichever
    order the storage copy writes files in, that checkpoint is never offered to resume from."""
    from training.train import complete_checkpoints
    from training.worker import STATE_MANIFEST, STATE_NAME

    ckpt = tmp_path / "ckpt"
    run_dir = tmp_path / "run"
    shutil.copytree(ckpt, run_dir / "epoch_0001")
    shutil.copytree(ckpt, run_dir / "epoch_0002")
    state = run_dir / "epoch_0002" / STATE_NAME
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert [p.name for p in complete_checkpoints(run_dir)] == ["epoch_0001"]
    (run_dir / "epoch_0002" / STATE_MANIFEST).unlink()  # written before the manifest: must still load
    assert [p.name for p in complete_checkpoints(run_dir)] == ["epoch_0001"]
    (run_dir / "epoch_0001" / STATE_MANIFEST).unlink()
    assert [p.name for p in complete_checkpoints(run_dir)] == ["epoch_0001"]


def test_pickle_adapters_are_refused(trained, tiny_pipe):
    _, _, adapter = trained
    meta = json.loads((adapter / META_NAME).read_text())
    torch.save({"x": torch.zeros(1)}, adapter / "pytorch_lora_weights.bin")
    meta["weights"] = "pytorch_lora_weights.bin"
    (adapter / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="only safetensors"):
        load_adapter(tiny_pipe, adapter)


def test_folder_without_metadata_is_refused(tmp_path, tiny_pipe):
    with pytest.raises(AdapterError, match=META_NAME):
        load_adapter(tiny_pipe, tmp_path)


def test_text_encoder_lora_round_trip(train_config, tmp_path):
    cfg = train_config(**{"train.epochs": 2, "lora.text_encoder": True, "train.lr": 5e-3})
    report = validate_dataset(cfg.data)
    spec = WorkerSpec(cfg, report.examples, report.fingerprint())
    parts, state = run_worker(spec)
    write_checkpoint(tmp_path / "ckpt", parts, state, adapter_meta(spec, state))
    keys = load_file(str(tmp_path / "ckpt" / ADAPTER_DIR / WEIGHTS_NAME)).keys()
    assert any(k.startswith("text_encoder.") for k in keys)
    pipe = load_pipeline(cfg.base_model, device="cpu")
    load_adapter(pipe, tmp_path / "ckpt" / ADAPTER_DIR)
    assert np.abs(_images(pipe) - _images(parts.pipe)).max() <= 1.0


def test_an_adapter_names_its_base_model_portably(repo, tmp_path, monkeypatch):
    """The JSON's base_model pointed into the job's temporary /tmp/ray/session_… upload: it names the model as the
    project does (hub id, or the project-relative folder)."""
    import training.adapter as worker
    import training.adapter_meta as names

    assert worker.portable_model_name(str(repo / "models" / "toy-sd")) == "models/toy-sd"
    assert worker.portable_model_name("models/toy-sd") == "models/toy-sd"
    assert worker.portable_model_name("stable-diffusion-v1-5/stable-diffusion-v1-5") == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )
    elsewhere = tmp_path / "my-model"
    elsewhere.mkdir()
    assert worker.portable_model_name(str(elsewhere)) == str(elsewhere)
    # inside a job, the code runs from the uploaded copy of the project: its models are named relative to it
    upload = tmp_path / "ray" / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    (upload / "models" / "toy-sd").mkdir(parents=True)
    monkeypatch.setattr(names, "PROJECT_ROOT", upload)  # where the names are made (training/adapter_meta.py)
    assert worker.portable_model_name(str(upload / "models" / "toy-sd")) == "models/toy-sd"
    # and a project-relative name compares as the same base model from any working directory
    monkeypatch.chdir(tmp_path)
    assert worker.base_model_id("models/toy-sd") == worker.base_model_id(str(upload / "models" / "toy-sd"))
    # a job's copy seen from outside it (a laptop reading a config the job logged): still the project's name
    monkeypatch.undo()
    job_copy = "/tmp/ray/session_2/runtime_resources/working_dir_files/_ray_pkg_3ad27e7e4ffd2d2a/models/toy-clip/"
    assert worker.portable_model_name(job_copy) == "models/toy-clip"
