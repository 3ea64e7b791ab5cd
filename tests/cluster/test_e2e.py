"""End to end on a real local cluster: `up` → the pipeline through `ray job submit` → a served champion → SDK
images → the dashboard's REST API lists the job and the Serve application → stop/--resume → `down` leaves
nothing behind. A decoy Ray head (plain `ray start --head`, Ray's default temp dir) starts right after `up` and
runs throughout: none of lorafleet's work may land on it. Slow (about 5 min on 2 idle cores, 20 on busy ones) and
run in CI. It must pass on a loaded machine: every wait is a condition with a generous limit, and every failing
command, job or CLI call puts its output's tail in the assertion message (tests/procs.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import httpx
import pytest

from cluster.jobs import EXCLUDES, Jobs
from cluster.local import Ports, answers, down, group_alive, port_free, status, up
from tests.cluster.decoy import Decoy, decoy_head, short_tmpdir
from tests.procs import describe, run_ok, tail, wait_until

# per test: the first one runs two pipeline jobs and a serve job, each with its own generous limit below
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
READY_S = 600  # a server, agent or job start on a loaded 2-core machine: limits for conditions, not sleeps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_tmpdir():
    """TMPDIR for this module (and every process it starts): Ray's default temp dir, shared by lorafleet's head and
    the decoy exactly like /tmp/ray, without capturing other people's `ray.init()` on this machine."""
    with short_tmpdir() as tmpdir, pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmpdir))
        yield tmpdir


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, ray_tmpdir):
    state_dir = tmp_path_factory.mktemp("cluster")
    ports = Ports(*(free_port() for _ in range(6)))
    state = up(state_dir, ports, num_cpus=4)  # 4 logical CPUs: the Serve replica and two trials fit at once
    again = up(state_dir)  # idempotent: the same processes
    assert (again.ray_pid, again.mlflow_pid) == (state.ray_pid, state.mlflow_pid)
    info = status(state_dir)
    assert info["up"] and info["components"]["ray"]["dashboard"] == state.dashboard_url
    # `up` waits for the dashboard; a job also needs the head's dashboard agent, which Ray's job head waits for only
    # 10 s (WAIT_AVAILABLE_AGENT_TIMEOUT) before `ray job submit` fails with "No available agent to submit job"
    agent = f"http://127.0.0.1:{ports.agent}/api/local_raylet_healthz"
    try:
        wait_until(lambda: answers(agent), f"the dashboard agent ({agent})", READY_S,
                   details=lambda: (Path(state_dir) / "ray.log").read_text())  # fmt: skip
    except AssertionError:
        down(state_dir)  # a fixture that fails before its yield gets no teardown
        raise
    yield state
    down(state_dir)
    if not state.temp_dir.startswith(str(state_dir)):  # the short /tmp/lorafleet-ray-<hash> (a long tmp path)
        shutil.rmtree(state.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def decoy(cluster, ray_tmpdir):
    """Started after `up`: Ray's "most recently started cluster" on this machine (its dashboard for the state API)."""
    with decoy_head(ray_tmpdir, dashboard=True) as head:
        yield head


@pytest.fixture(scope="module")
def jobs(cluster, decoy) -> Jobs:
    return Jobs(cluster.dashboard_url, cluster.mlflow_uri)


def assert_nothing_ran_on(decoy: Decoy) -> None:
    from ray.util.state import list_actors, list_jobs, list_tasks

    where = {"address": decoy.dashboard_url, "raise_on_missing_output": False}
    found = {"jobs": list_jobs(**where), "actors": list_actors(**where), "tasks": list_tasks(**where)}
    assert not any(found.values()), {k: [str(x)[:300] for x in v] for k, v in found.items() if v}


def token_headers() -> dict[str, str]:
    token = Path.home() / ".ray" / "auth_token"
    return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.is_file() else {}


def job_log(jobs: Jobs, job_id: str, limit: int = 20000) -> str:
    """The tail of a job's log, for an assertion message (never raises: the assertion is the failure)."""
    try:
        return tail(next(jobs.logs(job_id)), limit)
    except Exception as exc:  # noqa: BLE001
        return f"(the log of {job_id} could not be read: {exc!r})"


def job_ends(jobs: Jobs, job_id: str, timeout_s: float, expected: str = "SUCCEEDED") -> None:
    """Assert that the job ends with ``expected`` within ``timeout_s``; the message has its status and log tail."""
    try:
        status = jobs.wait(job_id, timeout_s=timeout_s)
    except TimeoutError as exc:
        status = str(exc)
    assert status == expected, f"job {job_id}: {status} (expected {expected})\n{job_log(jobs, job_id)}"


def cli_ok(capsys: pytest.CaptureFixture, argv: list[str]) -> None:
    """``lorafleet ARGV`` in this process exits 0; else the message shows what it printed (a followed job's log)."""
    from cluster.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    sys.stdout.write(out.out)  # still in pytest's captured output, in order
    sys.stderr.write(out.err)
    assert rc == 0, describe(["lorafleet", *argv], rc, out.out, out.err)


def get_ok(url: str, timeout: float = 120) -> httpx.Response:
    """GET that must answer 200; the message has the status and body."""
    resp = httpx.get(url, timeout=timeout)
    assert resp.status_code == 200, f"GET {url}: {resp.status_code} {resp.text[:2000]}"
    return resp


# configs/eval.yaml bounds latency at 2 s per image on 2 idle cores; these tests check behaviour on machines that
# may be busy, so the bound is lifted (every other check of the gate stays as shipped)
NO_LATENCY_BOUND = 'evaluation.overrides=["gate.checks.latency_p95_s={max: 600}"]'


def test_pipeline_through_ray_job_submit_serves_the_champion(
    cluster, decoy, jobs, repo, toy_world_data, tmp_path, capsys
):
    data = toy_world_data["dotted"]
    serve_port = cluster.ports.serve
    env = {"MLFLOW_TRACKING_URI": cluster.mlflow_uri, "HF_HUB_OFFLINE": "1", "LORAFLEET_SUBMISSION_ID": "e2e-pipeline"}
    runtime_env = {"excludes": EXCLUDES, "env_vars": env}
    overrides = [
        "name=e2e", f"output_dir={tmp_path / 'runs'}", f"serve.port={serve_port}",
        f"dataset={data.as_uri()}", f"heldout={(data / 'heldout').as_uri()}",  # read through pyarrow on workers
        'tune.overrides=["search.num_samples=1"]',  # the known-good point (configs/tune.yaml), one trial
        "evaluation.candidates=1", NO_LATENCY_BOUND,
    ]  # fmt: skip
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--no-wait", "--submission-id", "e2e-pipeline",
           "--working-dir", str(repo), "--runtime-env-json", json.dumps(runtime_env),
           "--", "python", "-m", "cluster.pipeline", "--config", "configs/pipeline.yaml", *overrides]  # fmt: skip
    cli_env = os.environ | {"RAY_API_SERVER_ADDRESS": cluster.dashboard_url, "RAY_AUTH_MODE": "token"}
    run_ok(cmd, env=cli_env, timeout=READY_S)  # uploads the working dir; a failure shows the CLI's output
    job_ends(jobs, "e2e-pipeline", 2400)

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
    assert apps["lorafleet"]["status"] == "RUNNING"
    assert set(apps["lorafleet"]["deployments"]) == {"Api", "Generator", "ImageUrls", "Feedback", "BatchWorker"}

    # MLflow: pipeline run → study (child) → trial (grandchild); the registry's champion alias
    from mlflow import MlflowClient

    ml = MlflowClient(cluster.mlflow_uri)
    run = ml.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["stage.smoke"] == "done"
    study = ml.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert [r.data.tags["lorafleet.kind"] for r in study] == ["search"]
    # the evaluate stage logs the gate into the (closed) study run through a tracker of its own (tuning.handoff)
    registered = f"{stages['register']['model']}/{version}"
    assert (study[0].data.tags["gate"], study[0].data.tags["registered_version"]) == ("passed", registered)
    children = ml.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{study[0].info.run_id}'")
    assert sorted(r.data.tags["lorafleet.kind"] for r in children) == ["evaluation", "trial"]
    assert all(r.data.tags["lorafleet.submission_id"] == "e2e-pipeline" for r in [run, *study, *children])

    # a rerun skips the finished search and the evaluated adapter, and refreshes the app
    rerun = jobs.submit("pipeline", "configs/pipeline.yaml", overrides, env={"HF_HUB_OFFLINE": "1"})
    job_ends(jobs, rerun, 1200)
    again = jobs.result(rerun)["stages"]
    statuses = [again[k]["status"] for k in ("tune", "evaluate", "deploy", "smoke")]
    assert statuses == ["skipped", "skipped", "done", "done"]
    assert again["register"]["version"] == version == again["smoke"]["version"]
    first = jobs.result("e2e-pipeline")  # the first job's own outcome is still there
    assert first["run_id"] == result["run_id"] and first["stages"]["tune"]["status"] == "done"

    # `lorafleet serve` deploys configs/serve.yaml as a second application (a job running serving.deploy)
    # (serving.deploy waits up to 600 s for /readyz; a failure puts Serve's own account of the app in the job log)
    argv = ["serve", "--address", cluster.dashboard_url, "--tracking-uri", cluster.mlflow_uri, "--name", "second",
            "--route-prefix", "/second", "--port", str(serve_port), "warmup=false"]  # fmt: skip
    cli_ok(capsys, argv)
    models = get_ok(f"http://127.0.0.1:{serve_port}/second/v1/models").json()["data"]
    assert {m["id"] for m in models} >= {"base", "champion"}
    assert ml.get_model_version_by_alias(stages["register"]["model"], "champion").version == version

    # every job, trial and replica ran on lorafleet's cluster; the decoy started after `up` got nothing
    from ray.util.state import list_actors

    ours = {
        a.class_name for a in list_actors(address=cluster.dashboard_url, limit=10000, raise_on_missing_output=False)
    }
    assert {"RayTrainWorker", "ServeReplica:lorafleet:Generator"} <= ours, ours
    assert_nothing_ran_on(decoy)


@pytest.mark.reliability  # a second whole pipeline (~6 min on 2 idle cores): `make reliability`; its parts run in CI
# (trigger detection: test_pipeline_config; two datasets' models served: test_app; a checkpoint promoted by eye:
# tests/evaluation/test_promote)
def test_a_second_dataset_configures_itself_and_is_served_next_to_the_first(
    cluster, decoy, jobs, tmp_path, capsys, toy_good_adapter
):
    """A user's own concept — here one the toy CLIP has no word for (`framed`), behind their own trigger — through
    one command with nothing but the dataset: the trigger is detected, the suite built from its captions, the gate
    judges it against the base model, and `qpv-lora` is registered and served beside the first model. Then a
    checkpoint picked from the trial's sample grids is promoted by hand."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from serving.client import Client
    from tests.serving.conftest import register_adapter
    from training.toy_world.dataset import write_finetune_dataset

    try:
        MlflowClient(cluster.mlflow_uri).get_registered_model("e2e-lora")
    except MlflowException:  # run alone (`make reliability`): the first dataset's model, as its pipeline registers it
        register_adapter(cluster.mlflow_uri, "e2e-lora", toy_good_adapter, status="passed")
    data = write_finetune_dataset(tmp_path / "qpv", trigger="qpv", concept="framed")
    plumbing = [
        f"output_dir={tmp_path / 'runs'}",
        f"serve.port={cluster.ports.serve}",  # this test's ports/folders
        'tune.overrides=["search.num_samples=1"]',
        "evaluation.candidates=1",
        NO_LATENCY_BOUND,
    ]  # and a 1-trial budget
    argv = [
        "submit",
        "pipeline",
        "--address",
        cluster.dashboard_url,
        "--tracking-uri",
        cluster.mlflow_uri,
        f"dataset={data}",
        "--follow",
        *plumbing,
    ]  # flags among the overrides, as the README writes them
    cli_ok(capsys, argv)
    job = max((j for j in jobs.list() if j.metadata.get("lorafleet.kind") == "pipeline"), key=lambda j: j.start_time)
    stages = jobs.result(job.submission_id)["stages"]
    assert stages["validate"]["trigger"] == "qpv"  # detected from the captions, not the toy default `sks`
    assert stages["evaluate"]["passed"], stages["evaluate"]["gate"]
    assert stages["register"]["model"] == "qpv-lora" and stages["smoke"]["model"] == "champion"
    ml = MlflowClient(cluster.mlflow_uri)
    assert ml.get_experiment_by_name("lorafleet-qpv") is not None
    first = ml.get_registered_model("e2e-lora")  # the first dataset's model keeps its own champion
    assert "champion" in first.aliases

    with Client(f"http://127.0.0.1:{cluster.ports.serve}", timeout=120) as client:
        ids = {m["id"] for m in client.models()}
        assert {"qpv-lora", "e2e-lora", "champion", "base"} <= ids, ids
        assert not any(i.startswith("qpv-lora/") and i != f"qpv-lora/{stages['register']['version']}" for i in ids)
        drawn = client.generate("a red circle on a qpv background", adapter="qpv-lora", seed=1)
    assert drawn[0].info["version"] == stages["register"]["version"]

    # the trial logged a sample grid and its adapter every 4 epochs; promote the epoch-4 one by eye
    trial = ml.search_runs(
        [ml.get_experiment_by_name("lorafleet-qpv").experiment_id], "tags.`lorafleet.kind` = 'trial'"
    )
    assert len(trial) == 1
    logged = {a.path for a in ml.list_artifacts(trial[0].info.run_id, "samples")}
    assert {"samples/epoch_0000.png", "samples/epoch_0004.png"} <= logged
    trial_id = trial[0].info.run_name.split()[0]
    argv = ["promote", "qpv-lora", "--trial", trial_id, "--epoch", "4", "--force", "--tracking-uri", cluster.mlflow_uri]
    cli_ok(capsys, argv)
    champion = ml.get_model_version_by_alias("qpv-lora", "champion")
    assert int(champion.version) == int(stages["register"]["version"]) + 1
    assert champion.tags["eval.comparable_key"] and champion.source.endswith("/adapter")


@pytest.mark.reliability  # 231 s on a loaded 2-core machine: `make reliability`
def test_stop_saves_the_trials_and_resume_finishes_them(cluster, jobs, toy_world_data, tmp_path):
    data = toy_world_data["dotted"]
    out = tmp_path / "runs"
    overrides = [
        "name=e2e-stop", f"output_dir={out}", f"dataset={data}", f"heldout={data / 'heldout'}", "until=tune",
        'tune.overrides=["search.num_samples=2", "search.scheduler=fifo", "search.max_epochs=4"]',
    ]  # fmt: skip
    job_id = jobs.submit("pipeline", "configs/pipeline.yaml", overrides, env={"HF_HUB_OFFLINE": "1"})
    trials = out / "e2e-stop" / "search" / "trials"

    def checkpointed() -> bool:  # a trial has saved epoch 2; a job that ended before that fails here, with its log
        assert jobs.status(job_id) in ("PENDING", "RUNNING"), f"job {job_id} ended early\n{job_log(jobs, job_id)}"
        return bool(list(trials.glob("*/ray/*/epoch_0002")))

    wait_until(checkpointed, f"a checkpoint of epoch 2 under {trials}", 2 * READY_S,
               details=lambda: job_log(jobs, job_id))  # fmt: skip
    assert jobs.stop(job_id)
    job_ends(jobs, job_id, READY_S, expected="STOPPED")
    log = next(jobs.logs(job_id))
    assert "SIGTERM: stopping the trials and saving the search" in log, tail(log, 20000)
    summary = json.loads((out / "e2e-stop" / "pipeline.json").read_text())
    assert summary["stages"]["tune"]["status"] == "stopped" and summary["status"] == "killed", summary
    assert not (out / "e2e-stop" / "search" / "best.json").exists()

    resumed = jobs.submit("pipeline", "configs/pipeline.yaml", overrides, resume=True, env={"HF_HUB_OFFLINE": "1"})
    job_ends(jobs, resumed, 1800)
    log = next(jobs.logs(resumed))
    assert "restoring the search" in log and "resumed from" in log, tail(log, 20000)  # a trial went on from its epoch
    rows = json.loads((out / "e2e-stop" / "search" / "results.json").read_text())
    assert len(rows) == 2 and all(r["status"] == "completed" and r["epochs"] == 4 for r in rows), rows
    stages = json.loads((out / "e2e-stop" / "pipeline.json").read_text())["stages"]
    assert list(stages) == ["validate", "tune"] and stages["tune"]["resumed"] is True


def test_down_leaves_no_process_behind(cluster, decoy):
    assert_nothing_ran_on(decoy)  # the stopped and resumed search too
    down(cluster.state_dir)
    assert not group_alive(cluster.ray_pid) and not group_alive(cluster.mlflow_pid)
    assert all(port_free(p) for p in (cluster.ports.ray, cluster.ports.dashboard, cluster.ports.mlflow))
    assert all(port_free(p) for p in (cluster.ports.serve, cluster.ports.client))
    from ray._private.utils import read_ray_address

    assert read_ray_address(cluster.temp_dir) is None  # the head's own "latest cluster" file is gone
    assert read_ray_address(str(decoy.temp_dir)) == decoy.gcs_address  # another cluster's file is not touched
