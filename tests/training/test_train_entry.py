"""The training entry point's checks before Ray starts: bad input is refused and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import PreflightError
from training.train import main, run


def test_config_problems_exit_2_and_name_every_key(repo, capsys):
    code = main(["--config", str(repo / "configs" / "train.yaml"), "train.lr=-1", "lora.rnak=4"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.lr" in err and "'rnak' is not a key of lora" in err


def test_bad_dataset_stops_before_anything_is_written(train_config, toy_dataset, tmp_path):
    (toy_dataset / "9999.png").write_bytes(b"not a png")
    with open(toy_dataset / "metadata.jsonl", "a") as f:
        f.write('{"file_name": "9999.png", "text": "a red circle on a sks background"}\n')
    cfg = train_config(**{"output_dir": str(tmp_path / "out")})
    with pytest.raises(ValueError, match="9999.png: cannot be read as an image"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_gpu_only_choices_stop_before_ray(repo, capsys):
    code = main(["--config", str(repo / "configs" / "train.yaml"), "train.optimizer=adamw8bit", "ray.use_gpu=false"])
    assert code == 2 and "train.optimizer: 'adamw8bit' needs a CUDA GPU" in capsys.readouterr().err


def test_existing_run_needs_resume(train_config):
    cfg = train_config()
    run_dir = Path(cfg.storage_path) / cfg.run_name
    (run_dir / "epoch_0001").mkdir(parents=True)
    with pytest.raises(PreflightError, match="--resume"):
        run(cfg)
