import json
import logging
import os
import sys
from pathlib import Path

import pytest

from cluster.cli import main
from tests.procs import describe, run_cmd, run_ok
from training.cluster_state import ClusterState, Ports


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
    out = run_ok([script, "--help"], timeout=120)
    assert "lorafleet" in out.stdout, out.stdout


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


@pytest.fixture
def up_with_mlflow(mlflow_server, tmp_path, monkeypatch) -> str:
    """The state of a running `lorafleet up` whose MLflow is the session's real server (this process stands in for
    the server's PID); no MLFLOW_TRACKING_URI in the environment."""
    port = int(mlflow_server.rsplit(":", 1)[1])
    ClusterState(str(tmp_path), Ports(mlflow=port), mlflow_pid=os.getpid()).save()
    monkeypatch.setenv("LORAFLEET_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return mlflow_server


@pytest.mark.slow  # the session's MLflow server starts in ~10 s
def test_registry_commands_find_the_mlflow_of_up(up_with_mlflow, capsys, monkeypatch):
    from mlflow import MlflowClient

    client = MlflowClient(up_with_mlflow, registry_uri=up_with_mlflow)
    name = "cli-up-model"
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    assert main(["registry", "show", name]) == 0  # was: "set MLFLOW_TRACKING_URI" while `up` ran
    assert main(["rollback", name]) == 1  # the registry answered: nothing to roll back to
    assert main(["promote", name, "7"]) == 1
    err = capsys.readouterr().err
    assert "set MLFLOW_TRACKING_URI" not in err and err.count("error:") == 2, err
    assert "MLFLOW_TRACKING_URI" not in os.environ  # set for the sub-command only

    seen = {}

    def spy(module: str):
        def main_(argv):
            seen[module] = (os.environ.get("MLFLOW_TRACKING_URI"), argv)
            return 0

        return main_

    for module in ("evaluation.evaluate", "evaluation.registry", "evaluation.publish", "training.train"):
        monkeypatch.setattr(f"{module}.main", spy(module))
    assert main(["evaluate", "--adapter", "a", "--config", "c.yaml"]) == 0
    assert main(["publish", "models:/x@champion", "--repo-id", "me/x"]) == 0
    assert main(["train", "--config", "c.yaml"]) == 0
    assert {m: uri for m, (uri, _) in seen.items()} == dict.fromkeys(
        ["evaluation.evaluate", "evaluation.publish", "training.train"], up_with_mlflow
    )
    # the user's choice wins: --tracking-uri, or MLFLOW_TRACKING_URI
    assert main(["promote", name, "1", "--tracking-uri", "http://127.0.0.1:1"]) == 0
    assert seen["evaluation.registry"] == (None, ["--tracking-uri", "http://127.0.0.1:1", "promote", name, "1"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:2")
    assert main(["evaluate", "--adapter", "a", "--config", "c.yaml"]) == 0
    assert seen["evaluation.evaluate"][0] == "http://127.0.0.1:2"


def test_mlflow_of_up_only_when_its_server_runs(tmp_path, monkeypatch):
    from cluster.cli import mlflow_of_up

    ClusterState(str(tmp_path), Ports(mlflow=1), mlflow_pid=2**22 + 12345).save()  # a stopped `up`
    monkeypatch.setenv("LORAFLEET_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with mlflow_of_up("registry", ["show", "x"]) as uri:
        assert uri is None and "MLFLOW_TRACKING_URI" not in os.environ


@pytest.mark.slow  # a fresh interpreter imports diffusers: ~10 s on 2 busy cores
def test_no_torchvision_notice_on_cli_calls(tmp_path):
    script = Path(sys.executable).parent / "lorafleet"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"LORAFLEET_STATE_DIR": str(tmp_path)}
    cmd = [script, "registry", "show", "x"]
    done = run_cmd(cmd, env=env, timeout=600)
    shown = describe(cmd, done.returncode, done.stdout, done.stderr)
    assert done.returncode == 2 and "set MLFLOW_TRACKING_URI" in done.stderr, shown  # it got as far as diffusers
    assert "requires torchvision" not in done.stderr, done.stderr


def test_library_noise_is_dropped_and_nothing_else():
    """The torchvision notice (every CLI call, every Ray worker) and diffusers' "No LoRA keys … text_encoder" (every
    UNet-only adapter load) are dropped; other warnings of the same loggers still reach the log."""
    from training.quiet import DROPPED, quiet_libraries

    quiet_libraries()
    quiet_libraries()  # idempotent
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage()[:40])

    transformers_log = logging.getLogger("transformers.utils.import_utils")
    lora = logging.getLogger("diffusers.loaders.lora_base")
    assert len(transformers_log.filters) == 1
    for logger in (transformers_log, lora):
        logger.addHandler(Keep())
    try:
        transformers_log.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for "
            "backward compatibility. Install torchvision to use the default backend."
        )
        transformers_log.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `Else`")
        transformers_log.warning("some other transformers warning")
        lora.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. This is safe")
        lora.warning("Loading adapter weights from state_dict led to unexpected keys")
    finally:
        for logger in (transformers_log, lora):
            logger.handlers = [h for h in logger.handlers if not isinstance(h, Keep)]
    assert seen == [
        "`CLIPImageProcessor` requires torchvisio",
        "some other transformers warning",
        "Loading adapter weights from state_dict ",
    ]
    assert "diffusers.loaders.peft" in DROPPED
    import os
    import warnings

    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"  # no download bars in job logs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_libraries()  # installs its filter in front of the default one
        warnings.warn("Already found a `peft_config` attribute in the model.", UserWarning, stacklevel=1)
        warnings.warn("another UserWarning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another UserWarning"]


def test_tests_never_see_a_developers_cluster(repo, tmp_path_factory):
    from training.cluster_state import default_state_dir

    state_dir = default_state_dir()
    assert state_dir != repo / "runs" / "cluster" and state_dir.is_relative_to(tmp_path_factory.getbasetemp())
    assert ClusterState.load() is None
