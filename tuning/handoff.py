"""The search's hand-off to evaluation: the best trial's adapter goes through the QA suite, gate and registry.

Configured by ``evaluation:`` in the tune config; no Ray here (the evaluation runs in the driver).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from training.configuration import load_config
from training.remote import localize
from training.tracking import GAP_RECORD, GAP_TAG, MlflowTracker, NullTracker
from tuning.config import TuneConfig

log = logging.getLogger(__name__)


def eval_config(cfg: TuneConfig, run_dir: Path, uri: str | None, parent: str | None, fetch: bool = True):
    """The ``EvalConfig`` for this search: its YAML, with data paths, MLflow and output folder taken from
    the search unless the hook's own overrides say otherwise.

    ``fetch``: the evaluation reads local folders, so a dataset URI becomes this node's mirror of it; config
    checks pass False (a submitting laptop must not download the dataset, or need its credentials).

    Raises:
        ConfigError: every problem of the evaluation config (checked before the search starts).
    """
    from evaluation.config import EvalConfig
    from evaluation.suite import default_model_name

    t = cfg.trial
    here = localize if fetch else str
    derived = [f"data.train_path={here(t.data.path)}", f"output_dir={run_dir / 'eval'}"]
    if t.validation.data_path:
        derived.append(f"data.heldout_path={here(t.validation.data_path)}")
    if t.validation.holdout:
        derived.append(f"data.holdout={t.validation.holdout}")  # the same images, held out the same way
    if t.data.instance_prompt:
        derived.append(f"data.instance_prompt={json.dumps(t.data.instance_prompt)}")
    for key in ("caption_column", "image_column", "caption_extension", "background"):  # read as training read it
        if key in t.data.model_fields_set:
            derived.append(f"data.{key}={json.dumps(getattr(t.data, key))}")
    if (size := trained_size(t.base_model, t.data.resolution)) is not None:
        derived.append(f"generation.resolution={size}")  # the adapter is judged at the size it learned
    if uri is None:
        derived += ["mlflow.enabled=false", "registry.enabled=false"]
    else:
        derived += [f"mlflow.tracking_uri={uri}"] + ([f"mlflow.parent_run_id={parent}"] if parent else [])
    overrides = derived + list(cfg.evaluation.overrides)
    ecfg = load_config(EvalConfig, cfg.evaluation.config, overrides)
    if ecfg.registry.model_name is None:  # named after the dataset as given (a URI's mirror has a hashed name)
        ecfg = load_config(
            EvalConfig, cfg.evaluation.config, [*overrides, f"registry.model_name={default_model_name(t.data.path)}"]
        )
    return ecfg


def trained_size(base_model: str, resolution: int | None) -> int | None:
    """The image side the evaluation must render at to judge the trials at the size they trained at: ``resolution``
    (the trials' ``data.resolution``), or None when it is the base model's own default size (``null`` in the
    evaluation config says that already, for every family: SDXL 1024, SD 1.5 512, toy 64) or not set. A base model
    whose configs cannot be read here gets the size explicitly."""
    if resolution is None:
        return None
    from evaluation.onnx_export import resolve_base
    from training.buckets import native_resolution

    try:
        native = native_resolution(resolve_base(base_model))
    except (OSError, ValueError, KeyError, TypeError):
        return resolution
    return None if native == resolution else resolution


def ranked_candidates(cfg: TuneConfig, summary: dict[str, Any], run_dir: Path, n: int) -> list[tuple[str, str]]:
    """Up to ``n`` (trial id, adapter folder): the best trial first, then the next by the search metric.

    Adapters other than the best one are exported from their trial's last checkpoint to ``candidates/<id>``.
    """
    import math

    from ray.train import Checkpoint

    from training.worker import ADAPTER_DIR

    best = summary["best"]
    out = [(best["trial_id"], best["adapter"])]
    records = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else []
    scored = [r for r in records if r["status"] != "failed" and r["checkpoint"] and r["trial_id"] != best["trial_id"]
              and r["metric"] is not None and math.isfinite(r["metric"])]  # fmt: skip
    scored.sort(key=lambda r: r["metric"], reverse=cfg.search.mode == "max")
    for r in scored[: max(n - 1, 0)]:
        target = run_dir / "candidates" / r["trial_id"] / ADAPTER_DIR
        if not target.is_dir():
            with Checkpoint(r["checkpoint"]).as_directory() as ckpt:  # local, shared FS or s3://
                shutil.copytree(Path(ckpt) / ADAPTER_DIR, target)
        out.append((r["trial_id"], str(target)))
    return out


def evaluate_best(
    cfg: TuneConfig,
    summary: dict[str, Any],
    run_dir: Path,
    uri: str | None,
    parent: str | None,
    candidates: int = 1,
    study: NullTracker | None = None,
):
    """Evaluate and gate ``summary["best"]``'s adapter — and, while the gate refuses, the next ``candidates - 1``
    trials by the search metric (the metric is a proxy: the lowest val_loss need not learn the concept best).
    The first adapter that passes is registered; the outcome goes to ``best.json`` (and the parent run: through
    ``study``, the search's open tracker, or else a tracker of its own with the per-call limits, whose gap — the
    server away — goes into the run's ``lorafleet.mlflow_gap.evaluation`` tag or ``mlflow_gap.jsonl``).

    Returns the last ``EvalResult`` (None when no trial finished).
    """
    from evaluation.evaluate import run as evaluate

    if not summary.get("best"):
        log.warning("no best trial: nothing to evaluate")
        return None
    ecfg = eval_config(cfg, run_dir, uri, parent)
    tried = []
    for trial_id, adapter in ranked_candidates(cfg, summary, run_dir, candidates):
        result = evaluate(ecfg, adapter)
        tried.append({"trial_id": trial_id, "passed": result.passed, "gate": result.gate.summary()})
        log.info("trial %s's adapter: %s", trial_id, result.gate.summary())
        if result.passed:
            break
    summary["evaluation"] = {
        "trial_id": trial_id,
        "adapter": adapter,
        "passed": result.passed,
        "gate": result.gate.summary(),
        "metrics": result.metrics,
        "base_metrics": result.base_metrics,
        "registry": result.registry,
        "report": str(Path(result.out_dir) / "report.html"),
        "run_id": result.run_id,
        "candidates": tried,
    }
    (run_dir / "best.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if uri and parent:
        tags = {"gate": "passed" if result.passed else "failed"}
        if result.registry.get("version"):
            tags["registered_version"] = f"{result.registry['model']}/{result.registry['version']}"
        if study is not None:  # the search's own tracker, still open (tuning.tune)
            study.set_tags(tags)
            study.log_artifact(run_dir / "best.json")
        else:  # the study's run was closed (a pipeline's evaluate stage): log into it, leave its status alone
            gap_tag = f"{GAP_TAG}.evaluation"
            with MlflowTracker(uri, parent, owns_run=False, local_record=run_dir / GAP_RECORD, gap_tag=gap_tag) as t:
                t.set_tags(tags)
                t.log_artifact(run_dir / "best.json")
    return result
