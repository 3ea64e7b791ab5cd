"""The fine-tuning service on a real local cluster, for the tests that drive it over HTTP with several tenants.

    service = start_service(cluster, tmp, tenants=["acme", "bravo"])   # `lorafleet serve` with a keys file
    acme = service.http("acme")                                         # httpx.Client with acme's API key
    file_id = upload(acme, toy_dataset)["id"]; job = create_job(acme, file_id, KNOWN_GOOD, suffix="style")
    wait_for_status(service, "acme", job["id"], ("succeeded", "failed"), JOB_S)

The Serve app is the one `lorafleet serve` deploys (a job running serving.deploy) with a keys file of real tenant keys
(``lorafleet keys add``'s ``add_key``), jobs submitted to the cluster by the app's own queue
(``cluster.finetune.RaySubmitter``), and every job capped by the operator's overrides to one evaluation candidate and
no latency bound (the machine is shared). Not a test module: ``test_finetune_cluster.py`` and
``test_finetune_queue.py`` use it.
"""

from __future__ import annotations

import io
import json
import secrets
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.jobs import Jobs
from serving.tenants import add_key
from tests.cluster.decoy import short_tmpdir
from tests.cluster.test_e2e import NO_LATENCY_BOUND, job_log
from tests.procs import wait_until

APP = "ft"
ADMIN_KEY_ENV = "LORAFLEET_FT_TEST_ADMIN_KEY"  # the default tenant's key (serving.deploy's POST /admin/reload)
JOB_S = 2400  # one pipeline job on a loaded 2-core machine
# configs/tune.yaml's known-good point (lr 3e-3 = 3 x trial.train.lr): passes the gate on the toy concepts
KNOWN_GOOD = {"n_epochs": 16, "learning_rate_multiplier": 3.0, "rank": 16, "optimizer": "adamw"}
# one epoch at lr 1e-5: the adapter barely moves, so the gate's concept checks (configs/eval.yaml) refuse it
TOO_LITTLE = {"n_epochs": 1, "learning_rate_multiplier": 0.01, "rank": 4, "optimizer": "adamw"}
# bitsandbytes' 8-bit AdamW on a CPU cluster: refused when the job is submitted, with the fix in the message
CPU_REFUSES = {"n_epochs": 1, "learning_rate_multiplier": 1.0, "rank": 4, "optimizer": "adamw8bit"}


@dataclass
class Service:
    """A deployed fine-tuning app: its URL, tenants' keys, folders and the cluster's Jobs client."""

    url: str
    keys: dict[str, str]
    files_root: Path
    jobs: Jobs
    argv: list[str]
    clients: dict[str, httpx.Client] = field(default_factory=dict)

    def http(self, tenant: str) -> httpx.Client:
        """A client that sends ``tenant``'s API key (one per tenant, kept open)."""
        if tenant not in self.clients:
            self.clients[tenant] = httpx.Client(
                base_url=self.url, headers={"Authorization": f"Bearer {self.keys[tenant]}"}, timeout=300
            )
        return self.clients[tenant]

    def job_folder(self, job_id: str) -> Path:
        return self.files_root / "jobs" / job_id

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


@pytest.fixture(scope="module")
def ray_tmpdir():
    """tests/cluster/test_e2e.py's ``ray_tmpdir`` (its ``cluster`` fixture asks for it by name, so a module importing
    this one gets it) plus the admin key in the environment of every process the cluster starts: with a keys file,
    the deploy job needs the ``api_key_env`` key, and secrets travel in the cluster's environment, never in a job's
    runtime env (cluster.jobs)."""
    with short_tmpdir() as tmpdir, pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmpdir))
        mp.setenv(ADMIN_KEY_ENV, secrets.token_urlsafe(32))
        yield tmpdir


def deploy(argv: list[str]) -> None:
    """``lorafleet serve ARGV`` (follows the deploy job until the app answers /readyz); asserts it exits 0."""
    from cluster.cli import main

    assert main(argv) == 0, f"lorafleet {' '.join(argv)} failed (its output is above)"


def start_service(cluster, tmp: Path, tenants: list[str], max_running: int = 2, per_tenant: int = 1) -> Service:
    """Deploy the app on ``cluster`` (tests/cluster/test_e2e.py's fixture) with a keys file holding ``tenants``."""
    keys_file = tmp / "keys.json"
    keys = {t: add_key(keys_file, t)[0] for t in tenants}
    every_job = json.dumps(["evaluation.candidates=1", NO_LATENCY_BOUND])  # the operator's: one candidate
    argv = ["serve", "--address", cluster.dashboard_url, "--tracking-uri", cluster.mlflow_uri, "--name", APP,
            "--port", str(cluster.ports.serve), "warmup=false", f"files.root={tmp / 'files'}",
            f"api_key_env={ADMIN_KEY_ENV}", f"tenants.keys_file={keys_file}",
            f"finetune.ray_address={cluster.dashboard_url}", "finetune.poll_s=1",
            f"finetune.max_running={max_running}", f"finetune.per_tenant={per_tenant}",
            f"finetune.overrides={every_job}"]  # fmt: skip
    wait_until(lambda: reachable(cluster), f"the Ray job API at {cluster.dashboard_url}", 600, poll_s=5)
    deploy(argv)
    url = f"http://127.0.0.1:{cluster.ports.serve}"
    return Service(url, keys, tmp / "files", Jobs(cluster.dashboard_url, cluster.mlflow_uri), argv)


def reachable(cluster) -> bool:
    """Whether a Jobs client connects (on a loaded machine the dashboard answers `up` before its job API does)."""
    from cluster.jobs import NoCluster

    try:
        Jobs(cluster.dashboard_url, cluster.mlflow_uri)
    except NoCluster:
        return False
    return True


def tar_gz(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(folder, arcname=folder.name)
    return buf.getvalue()


def upload(http: httpx.Client, folder: Path, expect: int = 200) -> dict[str, Any]:
    """POST /v1/files with ``folder`` as a tar.gz; asserts the status and returns the JSON body."""
    r = http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (f"{folder.name}.tar.gz", tar_gz(folder))})
    assert r.status_code == expect, f"POST /v1/files: {r.status_code} {r.text[:3000]}"
    return r.json()


def create_job(http: httpx.Client, file_id: str, hyperparameters: dict, suffix: str, seed: int = 0) -> dict[str, Any]:
    """POST /v1/fine_tuning/jobs for the base model; asserts 200 and returns the job object."""
    body = {"model": "base", "training_file": file_id, "suffix": suffix, "seed": seed,
            "hyperparameters": hyperparameters}  # fmt: skip
    r = http.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, f"POST /v1/fine_tuning/jobs: {r.status_code} {r.text[:3000]}"
    return r.json()


def job(service: Service, tenant: str, job_id: str) -> dict[str, Any]:
    r = service.http(tenant).get(f"/v1/fine_tuning/jobs/{job_id}")
    assert r.status_code == 200, f"GET job {job_id}: {r.status_code} {r.text[:2000]}"
    return r.json()


def events(service: Service, tenant: str, job_id: str) -> list[dict[str, Any]]:
    """The job's events, oldest first."""
    r = service.http(tenant).get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
    return list(reversed(r.json()["data"])) if r.status_code == 200 else []


def details(service: Service, tenant: str, job_id: str) -> str:
    """The job's events and its Ray job's log tail, for an assertion message."""
    lines = [f"{e['level']}: {e['message']}" for e in events(service, tenant, job_id)]
    return "\n".join(lines) + "\n" + job_log(service.jobs, job_id)


def wait_for_status(service: Service, tenant: str, job_id: str, statuses: tuple[str, ...], timeout_s: float) -> dict:
    """Poll the job until its status is one of ``statuses``; returns the job object."""
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.update(job(service, tenant, job_id))
        return seen["status"] in statuses

    wait_until(reached, f"job {job_id} to reach {statuses}", timeout_s, poll_s=2,
               details=lambda: details(service, tenant, job_id))  # fmt: skip
    return dict(seen)


def ray_ended(service: Service, job_id: str, timeout_s: float) -> str:
    """Wait for the Ray job ``job_id`` to end; its status (SUCCEEDED, FAILED, STOPPED)."""
    return service.jobs.wait(job_id, timeout_s=timeout_s)


def ray_jobs(service: Service) -> dict[str, Any]:
    """The cluster's Ray jobs by submission id (JobDetails)."""
    return {j.submission_id: j for j in service.jobs.list() if j.submission_id}


def wait_quiet(service: Service, timeout_s: float = 600) -> None:
    """Wait until no fine-tuning Ray job is PENDING or RUNNING (tests start from an idle queue)."""

    def quiet() -> bool:
        return not any(
            i.startswith("ftjob-") and j.status.value in ("PENDING", "RUNNING") for i, j in ray_jobs(service).items()
        )

    wait_until(quiet, "every fine-tuning Ray job to end", timeout_s, poll_s=2)
