import subprocess
import sys
from pathlib import Path

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
