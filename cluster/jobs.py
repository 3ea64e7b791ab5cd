"""Submit lorafleet jobs to a Ray cluster and follow them (``ray.job_submission.JobSubmissionClient``).

    from cluster.jobs import Jobs

    jobs = Jobs()                                   # $RAY_API_SERVER_ADDRESS / http $RAY_ADDRESS, else `lorafleet up`'s
    job_id = jobs.submit("pipeline", "configs/pipeline.yaml", ["tune.overrides=[search.num_samples=4]"])
    for line in jobs.logs(job_id, follow=True):
        print(line, end="")
    print(jobs.wait(job_id), jobs.result(job_id)["stages"])   # the result comes from MLflow, not the log
    jobs.stop(job_id)                               # SIGTERM: the pipeline saves its trials, then exits

The job runs in an upload of this checkout (``working_dir``) without .git, .venv, data/, runs/ and caches; its
environment gets ``MLFLOW_TRACKING_URI`` and, on a cluster on loopback, ``LORAFLEET_WORKDIR`` (this checkout,
where data/ and runs/ live). Configs are validated here, before anything is uploaded.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shlex
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from serving.config import PROJECT_ROOT
from training.cluster_state import enable_token_auth

EXCLUDES = [
    ".git", ".venv", "venv", "data", "runs", "mlruns", "mlartifacts", "**/__pycache__", "*.pyc",
    ".pytest_cache", ".ruff_cache", "*.egg-info", "build", "dist",
]  # fmt: skip
# Plain settings only: a runtime_env is job metadata that the dashboard and `ray job list` show to anyone with
# access, so secrets (HF_TOKEN, LORAFLEET_API_KEY) come from the cluster's own environment instead: the shell
# that ran `lorafleet up`, the image, or a Kubernetes Secret (cluster/kuberay/rayservice.yaml).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


@dataclass(frozen=True)
class JobKind:
    module: str  # python -m <module> --config <config> [overrides]
    config_model: str  # "<module>:<class>" validated before submitting
    default_config: str


KINDS = {
    "pipeline": JobKind("cluster.pipeline", "cluster.config:PipelineConfig", "configs/pipeline.yaml"),
    "tune": JobKind("tuning.tune", "tuning.config:TuneConfig", "configs/tune.yaml"),
    "train": JobKind("training.train", "training.config:TrainConfig", "configs/train.yaml"),
    "serve": JobKind("serving.deploy", "serving.config:ServeArgs", "configs/serve.yaml"),
}


class JobError(RuntimeError):
    """Submitting or following a job failed; the message says what to do."""


class NoCluster(JobError):
    """No Ray dashboard answers at the address."""


def dashboard_address(address: str | None = None) -> str:
    """The dashboard URL, explicitly: the argument, $RAY_API_SERVER_ADDRESS, an http $RAY_ADDRESS, or the running
    ``lorafleet up`` cluster's. Never Ray's implicit "latest cluster on this machine", which another
    ``ray start --head`` can be.

    Raises:
        NoCluster: none of them names a cluster (the message says how to start or name one).
    """
    from training.cluster_state import ClusterState, recorded_cluster

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address and os.environ.get("RAY_ADDRESS", "").startswith("http"):
        address = os.environ["RAY_ADDRESS"]
    if not address and (state := recorded_cluster()) is not None:
        address = state.dashboard_url
    if not address:
        stopped = ClusterState.load()
        where = f"lorafleet's cluster in {stopped.state_dir} is not running" if stopped else "no Ray cluster"
        raise NoCluster(f"{where}: run `lorafleet up`, or pass --address http://<head>:8265")
    return address if "://" in address else f"http://{address}"


def on_loopback(address: str) -> bool:
    return urlparse(address).hostname in ("127.0.0.1", "localhost", "::1")


def validate_config(kind: str, config: str, overrides: list[str]) -> Any:
    """Load and validate the job's config here, so a typo fails before the upload (ConfigError lists all)."""
    import importlib

    from serving.config import load_serve_args
    from training.configuration import load_config

    if kind == "serve":
        return load_serve_args(config, overrides)
    module, cls = KINDS[kind].config_model.split(":")
    cfg = load_config(getattr(importlib.import_module(module), cls), config, overrides)
    if kind == "pipeline":  # and the stages' own configs (tune, evaluation, serve) with their overrides
        from cluster.pipeline import Pipeline

        pipeline = Pipeline(cfg)
        pipeline.check_configs(pipeline.tune_config())
    return cfg


class Jobs:
    """A thin layer over ``JobSubmissionClient`` for lorafleet's entry points."""

    def __init__(self, address: str | None = None, tracking_uri: str | None = None):
        from ray.job_submission import JobSubmissionClient

        from training.cluster_state import ClusterState

        enable_token_auth()
        self.address = dashboard_address(address)
        state = ClusterState.load()
        # up's MLflow goes with up's cluster only: a job on another cluster must be told its server explicitly
        local = state.mlflow_uri if state and state.dashboard_url == self.address else None
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local
        try:
            self.client = JobSubmissionClient(self.address)
        except (ConnectionError, RuntimeError) as exc:
            raise NoCluster(f"cannot reach the Ray dashboard at {self.address}: {exc}; is the cluster up?") from exc

    # -- submit --------------------------------------------------------------------------------------------
    def runtime_env(self, submission_id: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        if self.tracking_uri:
            env_vars["MLFLOW_TRACKING_URI"] = self.tracking_uri
        if on_loopback(self.address):
            env_vars["LORAFLEET_WORKDIR"] = str(Path.cwd())  # data/ and runs/ are here, not in the upload
        env_vars["LORAFLEET_SUBMISSION_ID"] = submission_id
        if secrets := sorted(k for k in env or {} if any(h in k.upper() for h in SECRET_HINTS)):
            raise JobError(
                f"{', '.join(secrets)} would be stored in the job's metadata, readable in the dashboard: set it in "
                "the cluster's environment instead (the shell that runs `lorafleet up`, or a Kubernetes Secret)"
            )
        return {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES, "env_vars": env_vars | (env or {})}

    def node_count(self) -> int:
        from ray.util.state import list_nodes

        return sum(1 for n in list_nodes(address=self.address, raise_on_missing_output=False) if n.state == "ALIVE")

    def check_storage(self, kind: str, cfg: Any) -> None:
        """The multi-node rule (cluster.storage), before submitting."""
        from cluster.storage import storage_problems

        if kind == "pipeline":
            paths = {"output_dir": cfg.output_dir}
            shared = cfg.storage.shared
        elif kind in ("tune", "train"):
            trial = cfg.trial if kind == "tune" else cfg
            paths = {"output_dir": cfg.output_dir, "ray.storage_path": trial.ray.storage_path}
            shared = False
        else:
            return
        nodes = self.node_count()
        paths = {k: v for k, v in paths.items() if v}
        if not on_loopback(self.address):
            # relative paths are the job's, on the cluster: only URIs can be judged from here
            paths = {k: v for k, v in paths.items() if "://" in v or Path(v).is_absolute()}
        if problems := storage_problems(paths, nodes, shared):
            raise JobError("\n  - ".join(["shared storage needed:", *problems]))

    def submit(
        self,
        kind: str,
        config: str | None = None,
        overrides: list[str] | None = None,
        *,
        flags: list[str] | None = None,
        resume: bool = False,
        entrypoint_num_cpus: float = 0,
        entrypoint_num_gpus: float = 0,
        env: dict[str, str] | None = None,
        submission_id: str | None = None,
    ) -> str:
        """Validate ``config`` here, then submit ``python -m <module> --config … [flags] [overrides]``; returns its id.

        Raises:
            training.configuration.ConfigError: the config is invalid (nothing was submitted).
            JobError: the storage rule or the submission failed.
        """
        if kind not in KINDS:
            raise JobError(f"unknown job kind {kind!r}; choose one of {', '.join(KINDS)}")
        config = config or KINDS[kind].default_config
        overrides = list(overrides or [])
        cfg = validate_config(kind, config, overrides)
        self.check_storage(kind, cfg)
        rel = os.path.relpath(Path(config).resolve(), PROJECT_ROOT)
        if rel.startswith(".."):
            raise JobError(f"--config {config} is outside {PROJECT_ROOT}: the job only sees this checkout")
        parts = ["python", "-m", KINDS[kind].module, "--config", rel, *(["--resume"] if resume else []), *(flags or [])]
        entrypoint = shlex.join([*parts, *overrides])
        submission_id = submission_id or f"lorafleet-{kind}-{uuid.uuid4().hex[:8]}"
        try:
            return self.client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env=self.runtime_env(submission_id, env),
                metadata={"lorafleet.kind": kind, "lorafleet.config": rel},
                entrypoint_num_cpus=entrypoint_num_cpus,
                entrypoint_num_gpus=entrypoint_num_gpus,
            )
        except RuntimeError as exc:
            raise JobError(f"submitting to {self.address} failed: {exc}") from exc

    # -- follow --------------------------------------------------------------------------------------------
    def status(self, job_id: str) -> str:
        return str(self.client.get_job_status(job_id).value)

    def info(self, job_id: str):
        return self.client.get_job_info(job_id)

    def list(self) -> list:
        return self.client.list_jobs()

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 2.0) -> str:
        """Block until the job ends; returns SUCCEEDED, FAILED or STOPPED.

        Raises:
            TimeoutError: still running after ``timeout_s``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (status := self.status(job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {status} after {timeout_s:.0f}s")
            time.sleep(poll_s)
        return status

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        """The job's log; with ``follow``, chunks as they arrive until the job ends."""
        if not follow:
            yield self.client.get_job_logs(job_id)
            return
        chunks: queue.Queue = queue.Queue()
        done = object()

        async def pump() -> None:
            try:
                async for chunk in self.client.tail_job_logs(job_id):
                    chunks.put(chunk)
            finally:
                chunks.put(done)

        thread = threading.Thread(target=lambda: asyncio.run(pump()), daemon=True)
        thread.start()
        while (chunk := chunks.get()) is not done:
            yield chunk

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop (SIGTERM to its entry point, SIGKILL after RAY_JOB_STOP_WAIT_TIME_S)."""
        return self.client.stop_job(job_id)

    def result(self, job_id: str) -> dict[str, Any]:
        """What the job recorded: its MLflow run's ``pipeline.json`` (pipeline jobs), or the run's data.

        Raises:
            JobError: no MLflow run carries this job's id (it has not started one, or logged elsewhere).
        """
        from mlflow import MlflowClient

        if not self.tracking_uri:
            raise JobError("no MLflow server known: pass --tracking-uri or set MLFLOW_TRACKING_URI")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small JSON file
        from cluster.pipeline import JOB_TAG

        client = MlflowClient(self.tracking_uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = []
        # a pipeline run carries one tag per job that ran it (reruns reuse it); other runs carry the job's id
        for query in (f"tags.`{JOB_TAG}{job_id}` = 'pipeline'", f"tags.`lorafleet.submission_id` = '{job_id}'"):
            # the job's top run (pipeline, search) before its children
            runs = runs or client.search_runs(experiments, query, order_by=["attributes.start_time ASC"], max_results=1)
        if not runs:
            raise JobError(f"no MLflow run at {self.tracking_uri} is tagged with job {job_id}")
        run = runs[0]
        out: dict[str, Any] = {"run_id": run.info.run_id, "status": run.info.status, "metrics": run.data.metrics}
        try:
            path = client.download_artifacts(run.info.run_id, f"jobs/{job_id}/pipeline.json")
            out |= json.loads(Path(path).read_text())
        except Exception:  # noqa: BLE001 — tune/train runs have no pipeline.json
            out["tags"] = run.data.tags
        return out
