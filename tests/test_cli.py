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
