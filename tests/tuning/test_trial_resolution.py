"""A search whose trial config leaves data.resolution unset trains at the base model's native size: the JSON round
trips of tuning.tune (absolute paths, CPU-only choices) must not turn the field's default into a user's choice."""

from __future__ import annotations

import json
import shutil

import yaml

from tuning.config import TuneConfig
from tuning.space import for_hardware
from tuning.tune import absolute_paths


def test_an_unset_trial_resolution_becomes_the_base_models_native_size(repo, tiny_sdxl_dir, tmp_path, monkeypatch):
    base = shutil.copytree(tiny_sdxl_dir, tmp_path / "sdxl-128")
    unet_config = json.loads((base / "unet" / "config.json").read_text())
    (base / "unet" / "config.json").write_text(json.dumps(unet_config | {"sample_size": 16}))  # 16 × VAE 8 = 128 px
    (tmp_path / "vae").symlink_to(base / "vae")
    raw = yaml.safe_load((repo / "configs" / "tune-sdxl.yaml").read_text())
    raw["trial"]["data"].pop("resolution", None)
    raw["trial"] |= {"base_model": "sdxl-128", "pretrained_vae_model_name_or_path": "vae"}
    raw["trial"]["ray"]["use_gpu"] = False
    monkeypatch.chdir(tmp_path)  # relative paths, as a user gives them
    cfg = TuneConfig.model_validate(raw)
    assert "resolution" not in cfg.trial.data.model_fields_set
    settled, _ = for_hardware(absolute_paths(cfg))
    assert settled.trial.data.resolution == 128
    assert settled.trial.base_model == str(base.resolve())
    assert settled.trial.pretrained_vae_model_name_or_path == str((tmp_path / "vae").resolve())
