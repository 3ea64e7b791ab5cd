"""Ray Tune + Optuna searches on CPU: trials on Ray Train, MLflow parent/child runs, failures, restore."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from training.adapter import load_adapter
from training.families import load_pipeline
from tuning.tune import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    # the dashboard stays on: without it, finished trials' placement groups are not cleaned up
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _children(client: MlflowClient, parent: str) -> list:
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")


def test_four_trial_search_logs_a_study_and_hands_off_a_loadable_adapter(local_ray, tune_config, mlflow_server, repo):
    from tests.evaluation.conftest import SMALL_SUITE

    cfg = tune_config(
        "name=four",
        "search.num_samples=4",
        "search.max_epochs=1",
        f"trial.mlflow.tracking_uri={mlflow_server}",
        "trial.mlflow.experiment=test-tune",
        "evaluation.enabled=true",
        f"evaluation.config={repo / 'configs' / 'eval.yaml'}",
    )
    cfg.evaluation.overrides = [*SMALL_SUITE, f"clip_model={repo / 'models' / 'toy-clip'}", "registry.model_name=hook"]
    result = run(cfg)
    assert [r.status for r in result.records] == ["completed"] * 4
    assert len({json.dumps(r.params, sort_keys=True) for r in result.records}) == 4  # four different configs
    # the known-good default (configs/tune.yaml's points_to_evaluate) ran, its epochs capped by search.max_epochs
    default = dict(cfg.search.points_to_evaluate[0]) | {"train.epochs": 1}
    assert default["train.optimizer"] == "adamw" and any(r.params == default for r in result.records)

    best = json.loads((Path(result.run_dir) / "best.json").read_text())
    values = [r.metric for r in result.records]
    assert best["best"]["value"] == min(values) and best["trials"]["completed"] == 4
    pipe = load_pipeline(cfg.trial.base_model, device="cpu")
    meta = load_adapter(pipe, best["best"]["adapter"])
    assert meta.rank == best["best"]["overrides"]["lora.rank"] and meta.trigger == "sks"

    client = MlflowClient(mlflow_server)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "four"
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best["best"]["value"])
    runs = _children(client, result.parent_run_id)
    children = [c for c in runs if c.data.tags.get("lorafleet.kind") == "trial"]
    assert len(children) == 4
    for child in children:
        trial_id = child.info.run_name.split()[0]
        assert child.info.run_name.startswith(trial_id + " ") and "rank=" in child.info.run_name
        assert child.info.status == "FINISHED" and "val_loss" in child.data.metrics
    top = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"results.csv", "results.json", "best.json", "search_space.json", "plots", "best_adapter"} <= top
    plots = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/parallel_coordinate.png"} <= plots

    # the hand-off: the best adapter went through the QA suite and gate, as a child run of the study
    ev = best["evaluation"]
    assert ev["passed"] is result.evaluation.passed and ev["report"].endswith("report.html")
    assert ev["metrics"]["success_rate"] == 1.0 and "clip_t" in ev["base_metrics"]
    (evaluation,) = [c for c in runs if c.data.tags.get("lorafleet.kind") == "evaluation"]
    assert evaluation.data.tags["adapter_sha256"] == best["best"]["adapter_sha256"]
    version = client.get_model_version("hook", ev["registry"]["version"])
    assert version.tags["validation_status"] == ("passed" if ev["passed"] else "rejected")
    assert parent.data.tags["gate"] == ("passed" if ev["passed"] else "failed")


def test_a_failing_trial_is_recorded_as_failed_and_the_search_goes_on(local_ray, tune_config, mlflow_server):
    cfg = tune_config(
        "name=failing",
        "search.algorithm=grid",
        "search.scheduler=fifo",
        "grid={lora.target_modules: [[to_q, to_v], [no_such_layer]]}",
        "trial.train.epochs=1",
        f"trial.mlflow.tracking_uri={mlflow_server}",
        "trial.mlflow.experiment=test-tune",
    )
    result = run(cfg)
    by_status = {r.status: r for r in result.records}
    assert set(by_status) == {"completed", "failed"}
    failed = by_status["failed"]
    assert failed.metric is None and "no_such_layer" in (failed.error or "")
    assert result.best["best"]["trial_id"] == by_status["completed"].trial_id
    client = MlflowClient(mlflow_server)
    statuses = {c.data.tags["lorafleet.trial_status"]: c.info.status for c in _children(client, result.parent_run_id)}
    assert statuses == {"completed": "FINISHED", "failed": "FAILED"}


def _terminated(run_dir: Path) -> list[str]:
    """Trials Tune's last experiment snapshot records as finished."""
    done = []
    for state in run_dir.glob("tune/experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (json.JSONDecodeError, OSError):  # being rewritten
            continue
        done += [t["trial_id"] for t in (json.loads(d[0]) for d in trials) if t["status"] == "TERMINATED"]
    return done


@pytest.mark.reliability  # 121 s on a loaded 2-core machine: `make reliability`
def test_resume_after_the_driver_is_killed_runs_only_the_unfinished_trials(local_ray, tune_config, mlflow_server, repo):
    overrides = [
        "name=restore",
        "search.num_samples=3",
        "search.max_epochs=1",
        "search.scheduler=fifo",
        "search.max_concurrent_trials=1",
        f"trial.mlflow.tracking_uri={mlflow_server}",
        "trial.mlflow.experiment=test-tune",
        "evaluation.enabled=false",
    ]
    cfg = tune_config(*overrides)
    run_dir = Path(cfg.output_dir) / cfg.name
    # the driver joins this module's Ray (killing it ends its job and trials, not the cluster)
    env = dict(os.environ, RAY_ADDRESS=local_ray, PYTHONPATH=str(repo))
    t = cfg.trial
    args = [f"output_dir={cfg.output_dir}", f"trial.base_model={t.base_model}",
            f"trial.data.path={t.data.path}", f"trial.validation.data_path={t.validation.data_path}"]  # fmt: skip
    cmd = [sys.executable, "-m", "tuning.tune", "--config", str(repo / "configs" / "tune.yaml"), *args, *overrides]
    log = (Path(cfg.output_dir).parent / "driver.log").open("w")
    driver = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (done := _terminated(run_dir)):
            assert driver.poll() is None, "the driver exited before a trial finished"
            assert time.monotonic() < deadline, "no trial finished within 240 s"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert len(done) == 1
    first = run_dir / "trials" / done[0] / "result.json"
    finished_at = first.stat().st_mtime

    result = run(cfg, resume=True)
    assert len(result.records) == 3 and all(r.status == "completed" for r in result.records)
    assert first.stat().st_mtime == finished_at  # the finished trial was not run again
    assert len(list(run_dir.glob("trials/*/result.json"))) == 3
    client = MlflowClient(mlflow_server)
    children = _children(client, result.parent_run_id)
    assert len(children) == 3
    assert json.loads((run_dir / "best.json").read_text())["trials"]["completed"] == 3
    print(f"driver killed after {len(done)} of 3 trials; --resume ran the other {3 - len(done)}; "
          f"{len(children)} MLflow child runs (no duplicates)")  # fmt: skip
