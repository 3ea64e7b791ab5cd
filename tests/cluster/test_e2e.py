"""End to end on a real local cluster: `up` → the pipeline through `ray job submit` → a served champion → SDK
images → the dashboard's REST API lists the job and the Serve application → stop/--resume → `down` leaves
nothing behind. Slow (about 5 min on 2 cores) and run in CI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cluster.jobs import EXCLUDES, Jobs
from cluster.local import Ports, _group_alive, down, port_free, status, up

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster")
    ports = Ports(*(free_port() for _ in range(6)))
    state = up(state_dir, ports, num_cpus=4)  # 4 logical CPUs: the Serve replica and two trials fit at once
    again = up(state_dir)  # idempotent: the same processes
    assert (again.ray_pid, again.mlflow_pid) == (state.ray_pid, state.mlflow_pid)
    info = status(state_dir)
    assert info["up"] and info["components"]["ray"]["dashboard"] == state.dashboard_url
    yield state
    down(state_dir)


@pytest.fixture(scope="module")
def jobs(cluster) -> Jobs:
    return Jobs(cluster.dashboard_url, cluster.mlflow_uri)


def token_headers() -> dict[str, str]:
    token = Path.home() / ".ray" / "auth_token"
    return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.is_file() else {}


def wait_for(jobs: Jobs, job_id: str, timeout_s: float) -> str:
    status = jobs.wait(job_id, timeout_s=timeout_s)
    if status != "SUCCEEDED":
        print(next(jobs.logs(job_id))[-20000:])
    return status


def test_pipeline_through_ray_job_submit_serves_the_champion(cluster, jobs, repo, toy_world_data, tmp_path):
    data = toy_world_data["dotted"]
    serve_port = cluster.ports.serve
    env = {"MLFLOW_TRACKING_URI": cluster.mlflow_uri, "HF_HUB_OFFLINE": "1", "LORAFLEET_SUBMISSION_ID": "e2e-pipeline"}
    runtime_env = {"excludes": EXCLUDES, "env_vars": env}
    overrides = [
        "name=e2e", f"output_dir={tmp_path / 'runs'}", f"serve.port={serve_port}",
        f"dataset={data.as_uri()}", f"heldout={(data / 'heldout').as_uri()}",  # read through pyarrow on workers
        'tune.overrides=["search.num_samples=1"]',  # the known-good point (configs/tune.yaml), one trial
        "evaluation.candidates=1",
    ]  # fmt: skip
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--no-wait", "--submission-id", "e2e-pipeline",
           "--working-dir", str(repo), "--runtime-env-json", json.dumps(runtime_env),
           "--", "python", "-m", "cluster.pipeline", "--config", "configs/pipeline.yaml", *overrides]  # fmt: skip
    cli_env = os.environ | {"RAY_API_SERVER_ADDRESS": cluster.dashboard_url, "RAY_AUTH_MODE": "token"}
    subprocess.run(cmd, check=True, env=cli_env, capture_output=True, timeout=120)
    assert wait_for(jobs, "e2e-pipeline", 1200) == "SUCCEEDED"

    # the result comes from MLflow (the job's pipeline.json), not from the log
    result = jobs.result("e2e-pipeline")
    stages = result["stages"]
    assert list(stages) == ["validate", "tune", "evaluate", "gate", "register", "deploy", "smoke"]
    assert all(s["status"] == "done" for s in stages.values()), stages
    assert stages["validate"]["images"] == 20 and stages["validate"]["dataset"].startswith("file://")
    version = stages["register"]["version"]
    assert stages["smoke"]["version"] == version and Path(stages["smoke"]["image"]).is_file()

    # the SDK gets an image from the served champion
    from serving.client import Client

    with Client(f"http://127.0.0.1:{serve_port}", timeout=120) as client:
        images = client.generate("a blue square on a sks background", adapter="champion", seed=3)
    assert images[0].size == (64, 64) and images[0].info["version"] == version

    # the dashboard's REST API lists the job and the Serve application
    with httpx.Client(base_url=cluster.dashboard_url, headers=token_headers(), timeout=30) as dash:
        listed = {j["submission_id"]: j["status"] for j in dash.get("/api/jobs/").json()}
        apps = dash.get("/api/serve/applications/").json()["applications"]
    assert listed["e2e-pipeline"] == "SUCCEEDED"
    assert apps["lorafleet"]["status"] == "RUNNING" and set(apps["lorafleet"]["deployments"]) == {"Api", "Generator"}

    # MLflow: pipeline run → study (child) → trial (grandchild); the registry's champion alias
    from mlflow import MlflowClient

    ml = MlflowClient(cluster.mlflow_uri)
    run = ml.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["stage.smoke"] == "done"
    study = ml.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert [r.data.tags["lorafleet.kind"] for r in study] == ["search"]
    children = ml.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{study[0].info.run_id}'")
    assert sorted(r.data.tags["lorafleet.kind"] for r in children) == ["evaluation", "trial"]
    assert all(r.data.tags["lorafleet.submission_id"] == "e2e-pipeline" for r in [run, *study, *children])

    # a rerun skips the finished search and the evaluated adapter, and refreshes the app
    rerun = jobs.submit("pipeline", "configs/pipeline.yaml", overrides, env={"HF_HUB_OFFLINE": "1"})
    assert wait_for(jobs, rerun, 600) == "SUCCEEDED"
    again = jobs.result(rerun)["stages"]
    statuses = [again[k]["status"] for k in ("tune", "evaluate", "deploy", "smoke")]
    assert statuses == ["skipped", "skipped", "done", "done"]
    assert again["register"]["version"] == version == again["smoke"]["version"]
    first = jobs.result("e2e-pipeline")  # the first job's own outcome is still there
    assert first["run_id"] == result["run_id"] and first["stages"]["tune"]["status"] == "done"

    # `lorafleet serve` deploys configs/serve.yaml as a second application (a job running serving.deploy)
    from cluster.cli import main

    argv = ["serve", "--address", cluster.dashboard_url, "--tracking-uri", cluster.mlflow_uri, "--name", "second",
            "--route-prefix", "/second", "--port", str(serve_port), "warmup=false"]  # fmt: skip
    assert main(argv) == 0
    models = httpx.get(f"http://127.0.0.1:{serve_port}/second/v1/models", timeout=30).json()["data"]
    assert {m["id"] for m in models} >= {"base", "champion"}
    assert ml.get_model_version_by_alias("toy-sks-lora", "champion").version == version


def test_stop_saves_the_trials_and_resume_finishes_them(cluster, jobs, toy_world_data, tmp_path):
    data = toy_world_data["dotted"]
    out = tmp_path / "runs"
    overrides = [
        "name=e2e-stop", f"output_dir={out}", f"dataset={data}", f"heldout={data / 'heldout'}", "until=tune",
        'tune.overrides=["search.num_samples=2", "search.scheduler=fifo", "search.max_epochs=4"]',
    ]  # fmt: skip
    job_id = jobs.submit("pipeline", "configs/pipeline.yaml", overrides, env={"HF_HUB_OFFLINE": "1"})
    trials = out / "e2e-stop" / "search" / "trials"
    deadline = time.monotonic() + 600
    while not list(trials.glob("*/ray/*/epoch_0002")):
        assert time.monotonic() < deadline and jobs.status(job_id) in ("PENDING", "RUNNING"), next(jobs.logs(job_id))
        time.sleep(1)
    assert jobs.stop(job_id)
    assert jobs.wait(job_id, timeout_s=120) == "STOPPED"
    log = next(jobs.logs(job_id))
    assert "SIGTERM: stopping the trials and saving the search" in log
    summary = json.loads((out / "e2e-stop" / "pipeline.json").read_text())
    assert summary["stages"]["tune"]["status"] == "stopped" and summary["status"] == "killed"
    assert not (out / "e2e-stop" / "search" / "best.json").exists()

    resumed = jobs.submit("pipeline", "configs/pipeline.yaml", overrides, resume=True, env={"HF_HUB_OFFLINE": "1"})
    assert wait_for(jobs, resumed, 900) == "SUCCEEDED"
    log = next(jobs.logs(resumed))
    assert "restoring the search" in log and "resumed from" in log  # a trial went on from its checkpoint
    rows = json.loads((out / "e2e-stop" / "search" / "results.json").read_text())
    assert len(rows) == 2 and all(r["status"] == "completed" and r["epochs"] == 4 for r in rows)
    stages = json.loads((out / "e2e-stop" / "pipeline.json").read_text())["stages"]
    assert list(stages) == ["validate", "tune"] and stages["tune"]["resumed"] is True


def test_down_leaves_no_process_behind(cluster):
    down(cluster.state_dir)
    assert not _group_alive(cluster.ray_pid) and not _group_alive(cluster.mlflow_pid)
    assert all(port_free(p) for p in (cluster.ports.ray, cluster.ports.dashboard, cluster.ports.mlflow))
    assert all(port_free(p) for p in (cluster.ports.serve, cluster.ports.client))
    from ray._private.utils import read_ray_address

    assert read_ray_address() != cluster.address  # a later ray.init() starts its own instance
