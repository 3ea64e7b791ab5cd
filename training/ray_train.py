"""The thin Ray Train V2 wrapper around ``training.worker.run_worker`` (the only Ray in training/)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import ray
import ray.train
import ray.train.torch
from ray._private import ray_constants
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from training.cluster_state import HOST, enable_token_auth, free_port, private_temp_dir, recorded_cluster
from training.config import PreflightError, TrainConfig
from training.quiet import quiet_libraries
from training.tracking import GAP_RECORD, tracker_for
from training.worker import WorkerSpec, run_worker

log = logging.getLogger(__name__)


def init_ray() -> str:
    """Connect this driver to a Ray cluster, explicitly; returns the GCS address it joined (logged in one line).

    In order: ``$RAY_ADDRESS`` (inside a Ray job: the job's own cluster; else the user's choice) → the cluster
    ``lorafleet up`` recorded, when it runs → a private local instance on loopback, in a temp dir of its own
    (``training.cluster_state.private_temp_dir``). Never Ray's implicit "most recently started cluster" of
    ``/tmp/ray``: another ``ray start --head`` on the machine would capture this driver's work.
    """
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    if address := os.environ.get("RAY_ADDRESS"):
        if urlparse(address if "://" in address else f"ray://{address}").hostname in ("127.0.0.1", "localhost"):
            _loopback_only()  # a head on loopback (`lorafleet up`): this driver's node is 127.0.0.1 too
        enable_token_auth()
        ray.init(address=address)
        where = "$RAY_ADDRESS"
    elif (state := recorded_cluster()) is not None:
        _loopback_only()
        enable_token_auth()  # `ray start` turned token auth on; an explicit address does not send the token by itself
        ray.init(address=state.address)
        where = f"lorafleet's cluster (`lorafleet up`, state in {state.state_dir})"
    else:
        _loopback_only()
        temp_dir = private_temp_dir()
        # Ray's own workers (Train's PlacementGroupCleaner, the state API) look their cluster up when told no
        # address, which fails or finds another cluster when several run on the machine: the dashboard this
        # instance gets is named in the environment its processes inherit
        port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{HOST}:{port}"
        ray.init(address="local", _temp_dir=str(temp_dir), _node_ip_address=HOST, dashboard_host=HOST,
                 dashboard_port=port)  # fmt: skip
        where = f"a private local instance (temp dir {temp_dir}; no `lorafleet up` cluster is running)"
    joined = ray.get_runtime_context().gcs_address
    log.info("Ray: joined %s at %s", where, joined)
    return joined


def _loopback_only() -> None:
    # Without this a local Ray also listens on every interface. Ray reads the variable once, when it is
    # imported (this module imports it), so the constant it was read into is set too.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False


def _report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    name = f"epoch_{int(metrics['epoch']):04d}" if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)  # [3] a barrier on all ranks


def train_fn_per_worker(config: dict) -> list[dict[str, float]]:
    """Runs on every Train worker; resumes from Ray's latest checkpoint after a failure or a driver restart.

    Returns this worker's per-epoch metrics since it (re)started; Ray hands rank 0's to ``Result.return_value``.
    """
    quiet_libraries()  # this worker's process: no library noise in the job log
    spec = WorkerSpec.from_dict(config["spec"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    gap_record = Path(spec.cfg.output_dir) / GAP_RECORD  # this node's disk, when even the gap tag cannot be sent
    checkpoint = ray.train.get_checkpoint()  # [1] None on a fresh start
    fallback = config.get("resume_from")  # Ray's snapshot was lost (a full disk): the latest complete checkpoint
    # the tracker's exit flushes and states what MLflow missed; the run's status is the driver's to set
    with tracker_for(config.get("tracking_uri"), config.get("run_id"), rank, gap_record) as tracker:
        if spec.cfg.mlflow.system_metrics:
            tracker.start_system_metrics()
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(fallback) as resume_dir:
            _, state = run_worker(
                spec,
                device=ray.train.torch.get_device(),  # [2] this worker's GPU, or CPU
                rank=rank,
                world_size=world_size,
                prepare=ray.train.torch.prepare_model,  # DDP (gloo on CPU, nccl on GPU)
                resume_from=Path(resume_dir) if resume_dir else None,
                sink=_report,
                tracker=tracker,
            )
    return state.history


def build_trainer(
    cfg: TrainConfig,
    spec: WorkerSpec,
    *,
    tracking_uri: str | None,
    run_id: str | None,
    callbacks: list[UserCallback] | None = None,
    resume_from: str | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` whose scaling, failure and checkpoint policy come from ``cfg.ray``.

    ``callbacks``: e.g. Tune's ``TuneReportCallback`` when the trainer runs inside a Tune trial.
    ``resume_from``: a checkpoint folder (on storage every worker sees) used when Ray has none to hand back.
    """
    r = cfg.ray
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "spec": spec.to_dict(),
            "tracking_uri": tracking_uri,
            "run_id": run_id,
            "resume_from": resume_from,
        },
        scaling_config=ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker={"CPU": r.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=r.num_to_keep),
            worker_runtime_env={"env_vars": _forwarded_env()},
            callbacks=callbacks,
        ),
    )


def _forwarded_env() -> dict[str, str]:
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "MLFLOW_TRACKING_URI")
    return {k: os.environ[k] for k in keys if k in os.environ}


def check_resources(cfg: TrainConfig) -> None:
    """Fail fast, with the fix, when the cluster can never place the workers (Ray would wait forever)."""
    total = ray.cluster_resources()
    r = cfg.ray
    if r.use_gpu and total.get("GPU", 0) < 1:
        raise PreflightError(
            "ray.use_gpu=true but this Ray cluster has no GPU; set ray.use_gpu=false to train on CPU "
            "or start GPU workers (cluster/ configs)"
        )
    need_cpu = r.num_workers * r.cpus_per_worker
    if total.get("CPU", 0) < need_cpu and not r.use_gpu:
        raise PreflightError(
            f"ray.num_workers={r.num_workers} × ray.cpus_per_worker={r.cpus_per_worker} needs {need_cpu} CPUs; "
            f"the cluster has {total.get('CPU', 0)}. Lower one of them"
        )
