"""The search's hand-off to evaluation: the best trial's adapter goes through the QA suite, gate and registry.

Configured by ``evaluation:`` in the tune config; no Ray here (the evaluation runs in the driver).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from training.configuration import load_config
from tuning.config import TuneConfig

log = logging.getLogger(__name__)


def eval_config(cfg: TuneConfig, run_dir: Path, uri: str | None, parent: str | None):
    """The ``EvalConfig`` for this search: its YAML, with data paths, MLflow and output folder taken from
    the search unless the hook's own overrides say otherwise.

    Raises:
        ConfigError: every problem of the evaluation config (checked before the search starts).
    """
    from evaluation.config import EvalConfig

    t = cfg.trial
    derived = [f"data.train_path={t.data.path}", f"output_dir={run_dir / 'eval'}"]
    if t.validation.data_path:
        derived.append(f"data.heldout_path={t.validation.data_path}")
    if uri is None:
        derived += ["mlflow.enabled=false", "registry.enabled=false"]
    else:
        derived += [f"mlflow.tracking_uri={uri}"] + ([f"mlflow.parent_run_id={parent}"] if parent else [])
    return load_config(EvalConfig, cfg.evaluation.config, derived + list(cfg.evaluation.overrides))


def evaluate_best(cfg: TuneConfig, summary: dict[str, Any], run_dir: Path, uri: str | None, parent: str | None):
    """Evaluate and gate ``summary["best"]``'s adapter; record the outcome in ``best.json`` (and the parent run).

    Returns the ``EvalResult`` (None when no trial finished).
    """
    from evaluation.evaluate import run as evaluate

    best = summary.get("best")
    if not best:
        log.warning("no best trial: nothing to evaluate")
        return None
    ecfg = eval_config(cfg, run_dir, uri, parent)
    result = evaluate(ecfg, best["adapter"])
    summary["evaluation"] = {
        "passed": result.passed,
        "gate": result.gate.summary(),
        "metrics": result.metrics,
        "base_metrics": result.base_metrics,
        "registry": result.registry,
        "report": str(Path(result.out_dir) / "report.html"),
        "run_id": result.run_id,
    }
    (run_dir / "best.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if uri and parent:
        from evaluation.registry import client_for

        client = client_for(uri)
        client.set_tag(parent, "gate", "passed" if result.passed else "failed")
        if result.registry.get("version"):
            client.set_tag(parent, "registered_version", f"{result.registry['model']}/{result.registry['version']}")
        client.log_artifact(parent, str(run_dir / "best.json"))
    log.info("best trial's adapter: %s", result.gate.summary())
    return result
