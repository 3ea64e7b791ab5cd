import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "toy-world" in out and "dataset" in out


def test_no_command_is_an_error(capsys):
    assert main([]) == 2


def test_unknown_command_is_named(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_dataset_toy_writes_a_dataset(tmp_path):
    assert main(["dataset", "toy", str(tmp_path / "d"), "--num-images", "3"]) == 0
    assert len((tmp_path / "d" / "metadata.jsonl").read_text().splitlines()) == 3


def test_dataset_needs_a_kind(capsys):
    assert main(["dataset", "somewhere"]) == 2
    assert "dataset toy" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "lorafleet"
    assert script.exists(), "pip install -e . creates the `lorafleet` console script"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert "lorafleet" in out.stdout


def test_train_reports_config_problems(capsys, repo):
    assert main(["train", "--config", str(repo / "configs" / "train.yaml"), "train.optimizer=adam"]) == 2
    assert "train.optimizer" in capsys.readouterr().err


def test_tune_reports_config_and_preflight_problems_before_ray(capsys, repo, toy_dataset, tmp_path):
    config = str(repo / "configs" / "tune.yaml")
    assert main(["tune", "--config", config, "search.metric=accuracy"]) == 2
    assert "search.metric='accuracy' is not reported by trials" in capsys.readouterr().err
    assert main(["tune", "--config", config, "space.train.lr={type: uniform}"]) == 2
    assert "space.train.lr: Value error, type=uniform needs low and high" in capsys.readouterr().err
    heldout, out = toy_dataset / "heldout", tmp_path / "out"
    args = [f"trial.data.path={toy_dataset}", f"trial.validation.data_path={heldout}", f"output_dir={out}",
            "space.train.optimizer={type: choice, values: [adamw, adam]}"]  # fmt: skip
    assert main(["tune", "--config", config, *args]) == 2
    err = capsys.readouterr().err
    assert "cannot start the search" in err and "'adam'" in err
    assert not (tmp_path / "out").exists()  # nothing written
    assert main(["tune", "--config", config, *args[:3], "--resume"]) == 2
    assert "no search to resume" in capsys.readouterr().err
    # a search started with other values is not silently resumed with these
    from training.configuration import load_config
    from tuning.config import TuneConfig
    from tuning.space import for_hardware
    from tuning.tune import CONFIG_NAME, absolute_paths

    started, _ = for_hardware(load_config(TuneConfig, config, [*args[:3], "search.num_samples=3"]))
    started = absolute_paths(started)
    (tmp_path / "out" / "toy-sks" / "tune").mkdir(parents=True)
    (tmp_path / "out" / "toy-sks" / CONFIG_NAME).write_text(json.dumps(started.model_dump(mode="json")))
    assert main(["tune", "--config", config, *args[:3], "--resume"]) == 2
    assert "these keys differ now: search.num_samples. Resume with" in capsys.readouterr().err


def test_sample_compare_with_an_adapter_grid(tmp_path, train_config, repo):
    from training.data import validate_dataset
    from training.worker import ADAPTER_DIR, WorkerSpec, adapter_meta, run_worker, write_checkpoint

    cfg = train_config(**{"train.epochs": 1})
    report = validate_dataset(cfg.data)
    spec = WorkerSpec(cfg, report.examples, report.fingerprint())
    parts, state = run_worker(spec)
    write_checkpoint(tmp_path / "ckpt", parts, state, adapter_meta(spec, state))
    args = ["toy-world", "sample", "--model", str(repo / "models" / "toy-sd"), "--out", str(tmp_path / "s")]
    args += ["--adapter", str(tmp_path / "ckpt" / ADAPTER_DIR), "--compare", "--steps", "4"]
    assert main(args + ["--prompt", "a red circle on a sks background", "--prompt", "a blue square"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "s" / "grid.png").size == (2 * 64, 2 * 64)  # 2 prompts x (base, adapter)


@pytest.mark.parametrize("command", ["evaluate", "registry", "promote", "rollback", "publish"])
def test_evaluation_commands_have_help_and_reject_bad_arguments(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main([command, "--no-such-flag"])
    assert done.value.code == 2 and "error:" in capsys.readouterr().err


def test_evaluate_reports_config_problems(capsys, repo):
    config = str(repo / "configs" / "eval.yaml")
    assert main(["evaluate", "--adapter", "x", "--config", config, "gate.checks={beauty: {min: 1}}"]) == 2
    assert "gate.checks.beauty: unknown metric" in capsys.readouterr().err


def test_rollback_needs_to_know_where_the_registry_is(capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["rollback", "toy-sks-lora"]) == 2
    assert "set MLFLOW_TRACKING_URI or pass --tracking-uri" in capsys.readouterr().err
