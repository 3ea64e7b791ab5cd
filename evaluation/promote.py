"""Promote an adapter picked by eye: a trial's checkpoint from a sample grid, or any adapter reference.

    lorafleet promote ohwx-lora --trial 3f2a1_00002 --epoch 8        # the checkpoint under that trial's grid
    lorafleet promote ohwx-lora --adapter runs:/<run id>/checkpoints/epoch_0008/adapter
    lorafleet promote ohwx-lora --trial 3f2a1_00002 --epoch 8 --force   # even if the gate says no

While a search trains, every ``samples.every_n_epochs`` each trial logs a sample grid
(``samples/epoch_NNNN.png``) and that epoch's adapter (``checkpoints/epoch_NNNN/adapter``) to its MLflow run.
Promoting one runs the same evaluation the pipeline runs (the search's ``eval_config.json``: the suite built
from the dataset, the gate, the registry), so the new version carries metrics and a report like any other; it
becomes the champion when it passes, and with ``--force`` also when it does not (its status stays
``rejected``, and the report says why).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from evaluation.registry import RegistryError, client_for, promote

log = logging.getLogger(__name__)
EVAL_CONFIG = "eval_config.json"  # logged to a search's MLflow run: how the pipeline evaluates its adapters


def checkpoint_ref(run_id: str, epoch: int) -> str:
    """The MLflow reference of the adapter a trial logged with its epoch-``epoch`` sample grid."""
    return f"runs:/{run_id}/checkpoints/epoch_{epoch:04d}/adapter"


def find_trial_run(client, trial_id: str):
    """The newest MLflow trial run whose name starts with ``trial_id`` (trial runs are named ``<id> rank=…``).

    Raises:
        RegistryError: no trial run has that id.
    """
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"attributes.run_name LIKE '{trial_id.replace(chr(39), '')}%' AND tags.`lorafleet.kind` = 'trial'"
    runs = client.search_runs(experiments, query, order_by=["attributes.start_time DESC"], max_results=2)
    if not runs:
        raise RegistryError(f"no trial run named {trial_id!r} in MLflow: copy the trial id from its run's name")
    if len(runs) > 1:
        log.warning("several trial runs are named %s…; taking the newest (%s)", trial_id, runs[0].info.run_id)
    return runs[0]


def logged_epochs(client, run_id: str) -> list[int]:
    """Epochs whose adapter the trial logged (its sample grids' epochs)."""
    try:
        entries = client.list_artifacts(run_id, "checkpoints")
    except Exception:  # noqa: BLE001 — no such folder: no epochs
        return []
    names = [Path(e.path).name for e in entries if e.is_dir]
    return sorted(int(n.removeprefix("epoch_")) for n in names if n.startswith("epoch_") and n[6:].isdigit())


def search_eval_config(client, run) -> dict[str, Any] | None:
    """The evaluation config the trial's search logged (on the trial's parent run), or None."""
    parent = run.data.tags.get("mlflow.parentRunId")
    if not parent:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent, EVAL_CONFIG, tmp)
        except Exception:  # noqa: BLE001 — a search without the evaluation hook
            return None
        return json.loads(Path(path).read_text())


def promote_adapter(
    model: str,
    *,
    tracking_uri: str,
    trial: str | None = None,
    epoch: int | None = None,
    adapter: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Evaluate the chosen adapter, register it as a new version of ``model`` and make it the champion when it
    passes the gate (or anyway with ``force``). Returns ``{"version", "passed", "promoted", "gate", "report"}``.

    Raises:
        RegistryError: the trial, epoch or evaluation config cannot be found (the message lists what exists).
        training.configuration.ConfigError: the evaluation config is invalid.
    """
    from evaluation.config import EvalConfig
    from evaluation.evaluate import run as evaluate
    from training.configuration import load_config, validate_values

    client = client_for(tracking_uri)
    values: dict[str, Any] | None = None
    if trial is not None:
        if epoch is None:
            raise RegistryError("--trial needs --epoch (the epoch of the sample grid you picked)")
        found = find_trial_run(client, trial)
        epochs = logged_epochs(client, found.info.run_id)
        if epoch not in epochs:
            raise RegistryError(
                f"trial {trial} logged adapters at epochs {epochs or 'none'} (with its sample grids), not {epoch}"
            )
        adapter = checkpoint_ref(found.info.run_id, epoch)
        values = search_eval_config(client, found)
    if adapter is None:
        raise RegistryError("name the adapter: --trial ID --epoch N, or --adapter REF")
    derived = [f"registry.model_name={model}", f"mlflow.tracking_uri={tracking_uri}", "mlflow.parent_run_id=null"]
    if config is not None:
        cfg = load_config(EvalConfig, config, [*derived, *(overrides or [])])
    elif values is not None:
        cfg = validate_values(EvalConfig, values, [*derived, *(overrides or [])], f"{EVAL_CONFIG} of the search")
    else:
        raise RegistryError(f"{adapter}: no evaluation config logged with it; pass --config configs/eval.yaml")
    result = evaluate(cfg, adapter)
    version = result.registry.get("version")
    promoted = bool(result.passed and version)
    if not result.passed and force and version:
        promote(client, model, version, cfg.registry.alias, cfg.registry.previous_alias)
        promoted = True
    return {"adapter": adapter, "version": version, "passed": result.passed, "promoted": promoted,
            "gate": result.gate.summary(), "report": str(Path(result.out_dir) / "report.html")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from training.quiet import quiet_libraries

    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="lorafleet promote", description=__doc__.split("\n")[0])
    p.add_argument("model", help="the registered model, e.g. ohwx-lora")
    p.add_argument("--trial", help="the trial id (the start of its MLflow run name)")
    p.add_argument("--epoch", type=int, help="the epoch of the sample grid you picked")
    p.add_argument("--adapter", help="or any adapter: a folder, runs:/… or models:/… reference")
    p.add_argument("--config", help="evaluation config (default: the one the trial's search logged)")
    p.add_argument("--force", action="store_true", help="make it the champion even when the gate refuses it")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the evaluation config")
    args = p.parse_intermixed_args(argv)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        print("error: set MLFLOW_TRACKING_URI or pass --tracking-uri (where the registry lives)", file=sys.stderr)
        return 2
    from mlflow.exceptions import MlflowException

    from training.adapter import AdapterError
    from training.configuration import ConfigError
    from training.data import DatasetError

    try:
        out = promote_adapter(args.model, tracking_uri=uri, trial=args.trial, epoch=args.epoch, adapter=args.adapter,
                              config=args.config, overrides=args.overrides, force=args.force)  # fmt: skip
    except (RegistryError, ConfigError, AdapterError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:  # the server is down or refused the request
        print(f"error: MLflow at {uri} failed: {str(exc).splitlines()[0][:500]}", file=sys.stderr)
        return 1
    state = "champion" if out["promoted"] else "registered, not promoted (the gate refused it; --force overrides)"
    print(f"{args.model} version {out['version']}: {state}\n  {out['gate']}\n  report: {out['report']}")
    return 0 if out["promoted"] else 1


if __name__ == "__main__":
    sys.exit(main())
