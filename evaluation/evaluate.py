"""Evaluate a LoRA adapter on a fixed prompt suite, gate it, and register it in the MLflow model registry.

    python -m evaluation.evaluate --adapter runs/train/adapter --config configs/eval.yaml
    python -m evaluation.evaluate --adapter runs/train/adapter --config configs/eval.yaml \\
        data.train_path=data/ohwx data.heldout_path=data/ohwx/heldout  # another dataset: its own suite and model
    python -m evaluation.evaluate --adapter runs:/<run id>/best_adapter --config configs/eval.yaml
    python -m evaluation.evaluate --adapter models:/toy-sks-lora@champion --config configs/eval.yaml \\
        registry.enabled=false                                            # re-measure the champion
    python -m evaluation.evaluate --adapter runs/train/adapter --config configs/eval-toy-sks.yaml  # concept word
    python -m evaluation.evaluate --adapter runs/train/adapter --config configs/eval.yaml \\
        auto_suite.images_per_prompt=1 generation.steps=10                # tiny CPU run (~20 s)

Builds the suite from the dataset's captions unless the config has one (``evaluation.suite``), renders it with
the base model and with the adapter (same seeds), scores both with CLIP, runs the gate (thresholds relative to
the base model + "beats the champion"), writes ``<output_dir>/<sha256[:12]>/report.{md,html}``, grids,
``suite.json`` and ``metrics.json``, logs it all to an MLflow run, and registers the adapter: on a pass as the
new ``champion`` (the old one becomes ``previous``), on a fail tagged ``validation_status=rejected`` (or not at
all). Exit code: 0 passed, 1 the gate failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evaluation.config import EvalConfig
from evaluation.gate import GateResult, run_gate
from evaluation.metrics import ClipScorer, relative_metrics
from evaluation.qa import SuiteImages, heldout_set, reference_embeddings, render_suite, score
from evaluation.registry import (
    CHALLENGER,
    TAG_BASE,
    TAG_KEY,
    TAG_METRIC,
    TAG_SHA,
    TAG_STATUS,
    FetchedAdapter,
    RegistryError,
    client_for,
    current,
    fetch_adapter,
    promote,
    register,
    set_challenger,
    stored_metrics,
)
from evaluation.report import write_report
from evaluation.suite import materialise
from training.adapter import AdapterError, base_model_id
from training.configuration import ConfigError, load_config
from training.data import DatasetError
from training.tracking import GAP_RECORD, MlflowTracker, flatten, git_commit, resolve_tracking_uri, start_run

log = logging.getLogger("evaluation.evaluate")
CANDIDATE, CHAMPION = "candidate", "champion"


@dataclass
class EvalResult:
    out_dir: str
    adapter: dict[str, Any]
    metrics: dict[str, float]
    base_metrics: dict[str, float]
    gate: GateResult
    run_id: str | None = None
    tracking_uri: str | None = None
    registry: dict[str, Any] = field(default_factory=dict)  # model, version, status, alias moves

    @property
    def passed(self) -> bool:
        return self.gate.passed


class Evaluator:
    """The base pipeline and scorer, loaded once; base-model images and metrics computed once.

    ``cfg`` has its suite (``evaluation.suite.materialise``): every adapter is scored on the same prompts.
    """

    def __init__(self, cfg: EvalConfig, base_model: str):
        from training.families import load_pipeline

        if cfg.suite is None:
            raise ValueError("Evaluator needs a config with its suite: pass evaluation.suite.materialise(cfg, …)")
        self.cfg, self.base_model = cfg, base_model
        device = None if cfg.generation.device == "auto" else cfg.generation.device
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(["generation.device=cuda but torch sees no CUDA GPU; use auto or cpu"], "eval")
        self.pipe = load_pipeline(base_model, device=device)
        self.scorer = ClipScorer.load(cfg.clip_model, self.pipe.device)
        self.references = reference_embeddings(self.scorer, cfg.data, cfg.suite.trigger)
        resolution = cfg.generation.resolution or self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.heldout = heldout_set(self.pipe, cfg.data, cfg.suite.trigger, resolution)
        self.base = render_suite(self.pipe, cfg, adapter=None)
        self.base_metrics = self._score(self.base, None)
        self.loaded: set[str] = set()

    def _score(self, images: SuiteImages, base: SuiteImages | None) -> dict[str, float]:
        m = score(self.scorer, self.cfg.suite, images, base, self.references)
        if self.heldout is not None:
            held, parts = self.heldout
            m["heldout_loss"] = held.loss(parts)
        if base is not None:  # the base model's own metrics are measured first (in __init__)
            m |= relative_metrics(m, self.base_metrics)
        return m

    def evaluate(self, adapter: FetchedAdapter, name: str, timed: bool) -> tuple[dict[str, float], SuiteImages]:
        """Load ``adapter`` as ``name`` (LoRA weights only: the base stays shared) and score it."""
        from training.adapter import load_adapter

        if name in self.loaded:
            self.pipe.delete_adapters(name)
        load_adapter(self.pipe, adapter.path, adapter_name=name)
        self.loaded.add(name)
        images = render_suite(self.pipe, self.cfg, adapter=name, timed=timed)
        return self._score(images, self.base), images


def check_champion_base(cfg: EvalConfig, uri: str, base_model: str) -> None:
    """Refuse to gate an adapter against a champion of another base model (an SDXL adapter against an SD 1.x one):
    their metrics do not compare, and the alias would move to an adapter that the Serve replicas following it (one
    base model per replica) cannot load. Checked before anything is rendered.

    Raises:
        ConfigError: the registered model's champion was registered for another base model (its ``base_model`` tag).
    """
    r = cfg.registry
    version = current(client_for(uri), r.model_name, r.alias)
    theirs = version.tags.get(TAG_BASE) if version is not None else None
    if theirs and theirs != base_model_id(base_model):
        raise ConfigError(
            [
                f"registry.model_name={r.model_name}: its {r.alias} (version {version.version}) is an adapter for "
                f"base model {theirs!r}, this one is for {base_model_id(base_model)!r}. A registered model holds one "
                "base model's adapters (a Serve replica serves one base model): set registry.model_name to a new "
                "name (the pipeline: name=)"
            ],
            "eval",
        )


def champion_entry(cfg: EvalConfig, uri: str, evaluator: Evaluator, sha: str, dst: Path) -> dict | None:
    """The current champion's metrics on this suite: stored at its registration when that evaluation is
    comparable (same suite, seeds, scorer), else measured now. None when there is no champion; an entry
    with ``"same": True`` (and no metrics) when the candidate is the champion itself."""
    version = current(client_for(uri), cfg.registry.model_name, cfg.registry.alias)
    if version is None:
        return None
    entry = {"version": str(version.version), "sha256": version.tags.get(TAG_SHA, "")}  # int in SQLite stores
    if entry["sha256"] == sha:
        return entry | {"same": True}
    if version.tags.get(TAG_KEY) == cfg.comparable_key():
        return entry | {"metrics": stored_metrics(version), "source": "stored"}
    ref = f"models:/{cfg.registry.model_name}/{entry['version']}"
    log.info("re-evaluating %s on this suite (its stored metrics come from a different evaluation)", ref)
    fetched = fetch_adapter(ref, dst, uri, expected_base=evaluator.base_model)
    metrics, _ = evaluator.evaluate(fetched, CHAMPION, timed=False)
    return entry | {"metrics": metrics, "source": "re-evaluated"}


def open_eval_run(cfg: EvalConfig, uri: str, meta_tags: dict[str, str], sha: str) -> str:
    from mlflow import MlflowClient

    experiment = cfg.mlflow.experiment
    if cfg.mlflow.parent_run_id:  # children live in their parent's experiment (the MLflow UI nests them)
        client = MlflowClient(uri)
        experiment = client.get_experiment(client.get_run(cfg.mlflow.parent_run_id).info.experiment_id).name
    local = (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
    tags = {"lorafleet.kind": "evaluation"} | meta_tags
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    return start_run(uri, experiment, f"eval {sha[:12]}", tags, cfg.mlflow.parent_run_id, local)


def register_result(cfg: EvalConfig, client, run_id: str, result: EvalResult, champion: dict | None) -> dict[str, Any]:
    """Register per the gate and ``registry.on_fail``; move the aliases on a pass."""
    r = cfg.registry
    info: dict[str, Any] = {"model": r.model_name}
    if champion is not None and champion.get("same"):
        return info | {"action": "unchanged", "note": f"already {r.alias} (version {champion['version']})"}
    if champion is None:
        info["note"] = f"no {r.alias} yet"
    status = "passed" if result.passed else "rejected"
    if not result.passed and r.on_fail == "skip":
        return info | {"action": "not registered", "status": status}
    a = result.adapter
    tags = {
        TAG_SHA: a["sha256"],
        TAG_BASE: base_model_id(a["base_model"]),
        TAG_STATUS: status,
        TAG_KEY: cfg.comparable_key(),
        "trigger": cfg.suite.trigger,
        "eval_run_id": run_id,
    }
    tags |= {f"{TAG_METRIC}{k}": repr(v) for k, v in result.metrics.items() if not math.isnan(v)}
    version = register(client, r.model_name, f"runs:/{run_id}/adapter", run_id, tags, result.gate.summary())
    info |= {"version": str(version.version), "status": status, "action": "registered"}
    if result.passed and r.promote_to == CHALLENGER and champion is not None:  # the canary judges it next
        replaced = set_challenger(client, r.model_name, str(version.version), CHALLENGER, r.alias)
        info |= {"alias": CHALLENGER, "replaced": replaced}
    elif result.passed:
        replaced = promote(client, r.model_name, str(version.version), r.alias, r.previous_alias)
        info |= {"alias": r.alias, "replaced": replaced}
    return info


def run(cfg: EvalConfig, adapter_ref: str) -> EvalResult:
    """Fetch + verify → build the suite → render and score (base, adapter, champion) → gate → MLflow run →
    registry → report. Everything after the suite is built (comparable key, report, suite.json, params, the
    champion's comparison) uses the built suite and the resolved registry name.

    Works on any model family's base (``training.families``: SD 1.x/2.x, SDXL); images are square, of
    ``generation.resolution`` px, else the base pipeline's default size (SDXL 1024, SD 1.5 512, the toy models 64).

    Raises:
        ConfigError: no trigger, a trigger that is not the adapter's, a gate the built suite cannot measure, or a
            registered model whose champion is for another base model.
    """
    out_root = Path(cfg.output_dir).expanduser()
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, out_root) if cfg.mlflow.enabled else None
    fetched = fetch_adapter(adapter_ref, out_root / "downloads", uri, expected_base=cfg.base_model)
    meta = fetched.meta
    built = cfg.suite is None
    cfg = materialise(cfg, meta.trigger)
    if built:
        log.info("suite built from the dataset: %d trigger prompts, %d prior prompts (trigger %r)",
                 len(cfg.suite.prompts), len(cfg.suite.prior_prompts), cfg.suite.trigger)  # fmt: skip
    base_model = cfg.base_model or meta.base_model
    out_dir = out_root / meta.sha256[:12]
    adapter_info = {"ref": adapter_ref, "sha256": meta.sha256, "base_model": base_model, "path": str(fetched.path)}
    log.info("evaluating %s (sha256 %s…) on %s", adapter_ref, meta.sha256[:12], base_model)

    if cfg.registry.enabled and uri is not None:
        check_champion_base(cfg, uri, base_model)
    evaluator = Evaluator(cfg, base_model)
    metrics, images = evaluator.evaluate(fetched, CANDIDATE, timed=True)
    champion = None
    if cfg.registry.enabled and uri is not None:
        champion = champion_entry(cfg, uri, evaluator, meta.sha256, out_root / "downloads")
    rival = None if champion is None or champion.get("same") else champion
    gate = run_gate(metrics, cfg.gate, rival)
    result = EvalResult(str(out_dir), adapter_info, metrics, evaluator.base_metrics, gate, tracking_uri=uri)
    log.info("%s", gate.summary())

    if uri is None:
        write_outputs(cfg, result, evaluator, images)
        return result
    tags = {TAG_SHA: meta.sha256, TAG_BASE: base_model_id(base_model), "adapter_ref": adapter_ref,
            "gate": "passed" if gate.passed else "failed"}  # fmt: skip
    result.run_id = open_eval_run(cfg, uri, tags, meta.sha256)
    # the run ends with the block: FINISHED, or FAILED when anything in it raises (KILLED on Ctrl-C)
    with MlflowTracker(uri, result.run_id, local_record=out_dir / GAP_RECORD) as tracker:
        suite_params = {
            "suite.sha": cfg.suite.sha(),
            "suite.built": str(built),
            "suite.prompts": str(len(cfg.suite.prompts)),
        }
        tracker.log_params(flatten(cfg.model_dump(mode="json", exclude={"suite"})) | suite_params)
        logged = {k: v for k, v in metrics.items() if not math.isnan(v)}
        logged |= {f"base.{k}": v for k, v in evaluator.base_metrics.items() if not math.isnan(v)}
        if rival:
            logged |= {f"champion.{k}": v for k, v in rival["metrics"].items() if not math.isnan(v)}
        tracker.log_metrics(logged | {"gate_passed": float(gate.passed)}, step=0)
        tracker.log_artifacts(fetched.path, "adapter", required=True)  # must land before registering
        if cfg.registry.enabled:
            result.registry = register_result(cfg, client_for(uri), result.run_id, result, champion)
        for path in write_outputs(cfg, result, evaluator, images):
            tracker.log_artifact(path, "report/grids" if path.parent.name == "grids" else "report")
    return result


def write_outputs(cfg: EvalConfig, result: EvalResult, evaluator: Evaluator, images: SuiteImages) -> list[Path]:
    """The report files, ``suite.json`` and ``metrics.json`` in ``result.out_dir``; returns their paths."""
    out_dir = Path(result.out_dir)
    files = write_report(
        out_dir, cfg=cfg, adapter=result.adapter, metrics=result.metrics, base_metrics=result.base_metrics,
        gate=result.gate, base_images=evaluator.base, adapter_images=images, registry=result.registry or None,
    )  # fmt: skip
    (out_dir / "suite.json").write_text(json.dumps(cfg.suite.model_dump(mode="json"), indent=2) + "\n")
    return [*files, out_dir / "suite.json"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evaluation.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter folder, runs:/<run>/<path> or models:/<name>@<alias>")
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/eval.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. generation.steps=10")
    return parser.parse_args(argv)


def print_result(result: EvalResult) -> None:
    print(f"adapter {result.adapter['sha256'][:12]} ({result.adapter['ref']}) on {result.adapter['base_model']}")
    print(f"{'metric':22s} {'adapter':>10s} {'base':>10s}")
    for k, v in result.metrics.items():
        print(f"{k:22s} {v:10.4f} {result.base_metrics.get(k, math.nan):10.4f}")
    print(result.gate.summary())
    for check in result.gate.checks:
        print(f"  {'pass' if check.passed else 'FAIL'}  {check.describe()}")
    if result.registry:
        print("registry: " + ", ".join(f"{k}={v}" for k, v in result.registry.items()))
    print(f"report: {Path(result.out_dir) / 'report.html'}")
    if result.run_id:
        print(f"mlflow run: {result.run_id} ({result.tracking_uri})")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_config(EvalConfig, args.config, args.overrides)
        result = run(cfg, args.adapter)
    except (ConfigError, DatasetError, AdapterError, RegistryError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_result(result)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
