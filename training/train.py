"""Fine-tune a LoRA adapter on one dataset folder with Ray Train.

    python -m training.train --config configs/train.yaml
    python -m training.train --config configs/train.yaml train.epochs=1 data.max_images=8   # tiny CPU run
    python -m training.train --config configs/train.yaml --resume      # continue an interrupted run
    ray job submit --working-dir . -- python -m training.train --config configs/train.yaml

Writes ``<output_dir>/adapter`` (diffusers LoRA safetensors + lorafleet_adapter.json), Ray Train
checkpoints under ``<output_dir>/ray/<run_name>`` and ``<output_dir>/result.json``; logs to MLflow.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from training.adapter import verify_adapter
from training.buckets import resolve_bucket_step
from training.config import PreflightError, TrainConfig
from training.configuration import ConfigError, load_config
from training.data import DatasetError, validate_dataset
from training.init_adapter import InitAdapterError, check_init_adapter
from training.quiet import quiet_libraries
from training.tracking import (
    GAP_RECORD,
    MlflowTracker,
    driver_tracker,
    flatten,
    git_commit,
    resolve_tracking_uri,
    start_run,
)
from training.training_set import build_worker_spec, describe_epoch, epoch_counts
from training.worker import ADAPTER_DIR, WorkerSpec, trainer_state_is_whole

log = logging.getLogger("training.train")


@dataclass
class TrainResult:
    adapter_dir: str
    run_id: str | None
    tracking_uri: str | None
    metrics: dict[str, float]
    checkpoint: str
    history: list[dict[str, float]]  # rank 0's per-epoch metrics since its last (re)start


def preflight(cfg: TrainConfig, resume: bool) -> list[str]:
    """Problems that would only surface on the workers, found before anything starts or is written."""
    problems = cfg.combination_problems(cfg.model_dump())  # again: a config changed after validation
    if cfg.train.optimizer == "prodigy" and not 0.1 <= cfg.train.lr <= 10:
        log.warning("prodigy sets its own step size; train.lr=%g is a multiplier, usually 1.0", cfg.train.lr)
    if cfg.lora.init_adapter:
        try:
            check_init_adapter(cfg)
        except InitAdapterError as exc:
            problems.append(str(exc))
    run_dir = Path(cfg.storage_path) / cfg.run_name
    if "://" not in str(run_dir) and (problem := _unwritable(run_dir)):
        problems.append(problem)
    if not resume and "://" not in str(run_dir) and run_dir.is_dir() and any(run_dir.iterdir()):
        problems.append(
            f"run {cfg.run_name!r} already has checkpoints in {run_dir}; pass --resume to continue it, "
            "or set run_name (or output_dir) to start a new one"
        )
    return problems


# errno values that mean "this storage cannot take the checkpoint": no space, no permission, read-only, quota
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left",
    errno.EACCES: "permission denied",
    errno.EPERM: "not permitted",
    errno.EROFS: "read-only file system",
    errno.EDQUOT: "disk quota exceeded",
}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written to the storage path; the message names the path and what is kept."""


def _unwritable(run_dir: Path) -> str | None:
    """Why checkpoints cannot be written under ``run_dir`` (a probe file is created and removed), or None."""
    target = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    probe = (target or run_dir) / f".lorafleet-write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as exc:
        return (
            f"checkpoints cannot be written to {run_dir}: {exc.strerror or exc} ({probe.parent}); "
            "make it writable or set ray.storage_path (or output_dir) to a writable place"
        )
    return None


def storage_fault(exc: BaseException, run_dir: Path) -> CheckpointWriteError | None:
    """A Ray Train failure caused by the checkpoint storage -> an error naming the path, the cause, the fix and
    the checkpoints that are complete (kept as they were); None for other failures.

    Ray reports it as a ``ControllerError`` or a worker error carrying the ``OSError``'s text, without the path.
    """
    seen, chain = [], exc
    while chain is not None and len(seen) < 10:
        seen.append(chain)
        chain = chain.__cause__ or chain.__context__
    code = next((e.errno for e in seen if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS), None)
    if code is None:
        text = " ".join(str(e) for e in seen)
        code = next((c for c in STORAGE_ERRNOS if re.search(rf"\[errno {c}\]", text, re.IGNORECASE)), None)
    if code is None:
        return None
    if "lorafleet-ckpt-" in " ".join(str(e) for e in seen):  # the worker's staging folder, not the storage
        return CheckpointWriteError(
            code,
            f"a Train worker could not stage a checkpoint in its temporary folder: {STORAGE_ERRNOS[code]}. Free "
            f"space in the workers' TMPDIR (or point TMPDIR elsewhere); checkpoints under {run_dir} are unchanged",
        )
    complete = complete_checkpoints(run_dir)
    kept = (
        f"complete checkpoints are kept: {', '.join(p.name for p in complete)} (latest {complete[-1]})"
        if complete
        else "no checkpoint was complete yet"
    )
    err = CheckpointWriteError(
        code,
        f"writing a checkpoint under {run_dir} failed: {STORAGE_ERRNOS[code]} ({os.strerror(code)}). {kept}. "
        "Free space (or fix the permissions) there, or set ray.storage_path to another place, then rerun with "
        "--resume to continue from the latest complete checkpoint",
    )
    err.filename = str(run_dir)
    return err


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders whose adapter verifies and whose trainer state matches its manifest (sha256), oldest first."""
    out = []
    for ckpt in sorted(run_dir.glob("epoch_*")) if run_dir.is_dir() else []:
        try:
            verify_adapter(ckpt / ADAPTER_DIR)
        except Exception:  # noqa: BLE001 - a partial or corrupt checkpoint is not complete
            continue
        if trainer_state_is_whole(ckpt):
            out.append(ckpt)
    return out


def resume_fallback(run_dir: Path) -> str | None:
    """When Ray's checkpoint snapshot is missing or unreadable (a write that hit a full disk leaves it empty),
    the latest complete checkpoint to resume from; the unreadable snapshot is moved aside. None: Ray knows."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        json.loads(snapshot.read_text())
        return None
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        aside = snapshot.with_suffix(".json.unreadable")
        log.warning("Ray's checkpoint snapshot %s is unreadable (%s); moved to %s", snapshot, exc, aside.name)
        snapshot.replace(aside)
    complete = complete_checkpoints(run_dir)
    if complete:
        log.info("resuming from the latest complete checkpoint %s", complete[-1])
    return str(complete[-1]) if complete else None


def open_run(cfg: TrainConfig, spec: WorkerSpec, resume: bool) -> tuple[str | None, str | None]:
    """Create (or, on resume, reopen) the MLflow run in the driver; return (tracking URI, run id)."""
    if not cfg.mlflow.enabled:
        return None, None
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.output_dir)
    marker = Path(cfg.output_dir) / "mlflow_run.json"
    run_id = cfg.mlflow.run_id
    if run_id is None and resume and marker.is_file():
        run_id = json.loads(marker.read_text())["run_id"]
    if run_id is None:
        tags = {
            "base_model": cfg.base_model,
            "dataset_hash": spec.dataset_hash,
            "lorafleet.kind": "trial" if cfg.mlflow.parent_run_id else "train",
        }
        if commit := git_commit():
            tags["mlflow.source.git.commit"] = commit
        # with the SQLite fallback, artifacts live next to it (a server decides for itself)
        local = (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        name = cfg.mlflow.run_name or cfg.run_name
        run_id = start_run(uri, cfg.mlflow.experiment, name, tags, cfg.mlflow.parent_run_id, local)
        counts = {f"data.{k}": str(v) for k, v in epoch_counts(spec.examples).items()}  # images, × repeats, class
        # run() ends the run; this exit only sends (or states) the params
        with MlflowTracker(uri, run_id, owns_run=False, local_record=Path(cfg.output_dir) / GAP_RECORD) as tracker:
            tracker.log_params(flatten(cfg.model_dump(mode="json")) | counts)
    marker.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}) + "\n")
    return uri, run_id


def planned_spec_batches(cfg: TrainConfig, spec: WorkerSpec) -> int | None:
    """Batches per epoch on each worker, as the workers will count them (repeats and class images included);
    None when the bucket step is only known on the workers (the base model's configs could not be read)."""
    from training.buckets import assign_buckets
    from training.dataset import planned_batches

    if cfg.data.buckets and not cfg.data.bucket_step:
        return None
    assigned = assign_buckets([e.path for e in spec.examples], cfg.data, cfg.data.bucket_step or 1)
    return planned_batches(assigned, spec.examples, cfg.train.batch_size, cfg.ray.num_workers)


def export_adapter(checkpoint_dir: Path, output_dir: Path) -> Path:
    """Copy the final checkpoint's adapter to ``<output_dir>/adapter`` (verified on the way)."""
    target = output_dir / ADAPTER_DIR
    tmp = output_dir / f".{ADAPTER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir / ADAPTER_DIR, tmp)
    verify_adapter(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/train.yaml")
    parser.add_argument("--resume", action="store_true", help="continue the run's latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 data.max_images=8")
    return parser.parse_intermixed_args(argv)


def run(cfg: TrainConfig, *, resume: bool = False, callbacks: list | None = None) -> TrainResult:
    """Validate → preflight → MLflow run → Ray Train fit → export the adapter. Raises on any failure.

    ``callbacks`` go to the trainer's ``RunConfig`` (a Tune trial passes ``TuneReportCallback``).
    """
    cfg = resolve_bucket_step(cfg)  # data.resolution unset: the model's native size; data.bucket_step: its granularity
    report = validate_dataset(cfg.data)
    log.info("%s", report.summary())
    report.raise_if_errors()  # nothing has been written yet
    if problems := preflight(cfg, resume):
        raise PreflightError("cannot start training:\n  - " + "\n  - ".join(problems))
    spec = build_worker_spec(cfg, report)  # held-out split on the instance images, then the class images
    log.info("%s", describe_epoch(cfg, spec.examples, planned_spec_batches(cfg, spec)))
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    uri, run_id = open_run(cfg, spec, resume)

    from training.ray_train import build_trainer, check_resources, init_ray  # Ray only past validation

    # the run ends with the block: FINISHED, or FAILED when anything below raises; what MLflow missed is stated
    with driver_tracker(uri, run_id, local_record=output_dir / GAP_RECORD) as tracker:
        init_ray()
        check_resources(cfg)
        run_dir = Path(cfg.storage_path) / cfg.run_name
        fallback = resume_fallback(run_dir) if resume and "://" not in cfg.storage_path else None
        trainer = build_trainer(cfg, spec, tracking_uri=uri, run_id=run_id, callbacks=callbacks, resume_from=fallback)
        try:
            result = trainer.fit()
        except Exception as exc:
            if "://" not in cfg.storage_path and (fault := storage_fault(exc, run_dir)):
                raise fault from exc
            raise
        with result.checkpoint.as_directory() as ckpt:
            adapter = export_adapter(Path(ckpt), output_dir)
        meta = verify_adapter(adapter)
        tracker.log_artifacts(adapter, "adapter")
        tracker.set_tags({"adapter_sha256": meta.sha256, "trigger": str(meta.trigger)})
    history = list(result.return_value or [])
    out = TrainResult(str(adapter), run_id, uri, dict(result.metrics or {}), result.checkpoint.path, history)
    (output_dir / "result.json").write_text(json.dumps(asdict(out), indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        result = run(cfg, resume=args.resume)
    except (ConfigError, DatasetError, PreflightError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckpointWriteError as exc:
        print(f"error: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"adapter: {result.adapter_dir}")
    print(f"metrics: {json.dumps(result.metrics)}")
    if result.run_id:
        print(f"mlflow run: {result.run_id} ({result.tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
