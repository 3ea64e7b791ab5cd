"""The end-to-end job: validate dataset → tune → evaluate the best adapter → gate → register (alias champion)
→ deploy or refresh the Serve application → smoke-test its HTTP endpoint.

    python -m cluster.pipeline --config configs/pipeline.yaml
    python -m cluster.pipeline --config configs/pipeline.yaml 'tune.overrides=["search.num_samples=2"]' until=tune
    lorafleet submit pipeline --config configs/pipeline.yaml --follow      # the same as a Ray job
    python -m cluster.pipeline --config configs/pipeline.yaml --resume     # after `lorafleet stop` (SIGTERM)

Writes ``<output_dir>/<name>/``: ``pipeline.json`` (every stage's outcome and time; the job's result),
``search/`` (the tune run: study, trials, best adapter, evaluation report) and ``smoke.png``. MLflow: one
pipeline run (stage times, outcome, pipeline.json), the study as its child run, trials as the study's children.
A rerun skips what is done (a finished search, an evaluated best adapter); a failed stage leaves earlier
results as they were. Exit codes: 0 served, 1 the gate or smoke test failed, 2 bad config or data,
3 stopped (resume with --resume).

Relative paths (dataset, output_dir) mean ``$LORAFLEET_WORKDIR`` when set — ``lorafleet submit`` sets it to
the submitting checkout on a local cluster, since ``--working-dir`` uploads leave out data/ and runs/ — else
the current folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import STAGES, PipelineConfig
from serving.config import PROJECT_ROOT

log = logging.getLogger("cluster.pipeline")
SUMMARY = "pipeline.json"
SEARCH = "search"  # the tune run's name inside the pipeline folder
JOB_TAG = "lorafleet.job."  # + submission id, on the pipeline run of every job that ran it
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STOPPED = 0, 1, 2, 3


class StageFailed(RuntimeError):
    """A stage ended without the result the next one needs (not a bug: e.g. the gate said no)."""


class Stopped(RuntimeError):
    """SIGTERM (``ray job stop`` / ``lorafleet stop``) arrived; finished work and checkpoints are kept."""


@dataclass
class PipelineResult:
    run_dir: str
    summary: dict[str, Any]
    run_id: str | None = None
    tracking_uri: str | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


def workdir() -> Path:
    return Path(os.environ.get("LORAFLEET_WORKDIR") or os.getcwd())


def resolve(path: str | None) -> str | None:
    """Relative data/output paths → under the work dir; URIs and absolute paths as they are."""
    if path is None or "://" in path or Path(path).expanduser().is_absolute():
        return path if path is None or "://" in path else str(Path(path).expanduser())
    return str(workdir() / path)


def config_file(path: str) -> str:
    """A stage's config file: as given, else inside this checkout (the job's working dir)."""
    p = Path(path)
    return str(p if p.is_absolute() or p.exists() else PROJECT_ROOT / p)


class _SigTerm:
    """SIGTERM outside the search stops the pipeline at once (inside it, ``tuning.tune`` stops Tune gracefully)."""

    def __init__(self):
        self.received = False

    def __call__(self, signum, frame) -> None:
        self.received = True
        raise Stopped("stopped by SIGTERM")

    def check(self) -> None:
        if self.received:
            raise Stopped("stopped by SIGTERM")


class Pipeline:
    def __init__(self, cfg: PipelineConfig, *, resume: bool = False):
        self.cfg, self.resume = cfg, resume
        self.run_dir = Path(resolve(cfg.output_dir)) / cfg.name
        self.search_dir = self.run_dir / SEARCH
        self.summary: dict[str, Any] = {"name": cfg.name, "stages": {}}
        self.uri: str | None = None
        self.run_id: str | None = None
        self.serve_args = None  # the deploy stage's ServeArgs
        self.sigterm = _SigTerm()

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _save(self) -> None:
        (self.run_dir / SUMMARY).write_text(json.dumps(self.summary, indent=2, default=str) + "\n")

    def _stage(self, name: str, fn, *args) -> Any:
        """Run one stage: time it, record its outcome in pipeline.json and on the MLflow run."""
        from mlflow import MlflowClient

        self.sigterm.check()
        log.info("stage %s …", name)
        started = time.monotonic()
        record: dict[str, Any] = {"status": "running"}
        self.summary["stages"][name] = record
        try:
            out = fn(*args)
        except BaseException as exc:
            record |= {"status": "stopped" if isinstance(exc, Stopped) else "failed", "error": str(exc)[:2000]}
            raise
        else:
            skipped = isinstance(out, dict) and out.pop("skipped", False)
            record |= {"status": "skipped" if skipped else "done", **(out if isinstance(out, dict) else {})}
            return out
        finally:
            record["seconds"] = round(time.monotonic() - started, 1)
            self._save()
            if self.run_id:
                client = MlflowClient(self.uri)
                client.log_metric(self.run_id, f"stage_seconds.{name}", record["seconds"])
                client.set_tag(self.run_id, f"stage.{name}", record["status"])
            log.info("stage %s: %s (%.1f s)", name, record["status"], record["seconds"])

    # -- configs -------------------------------------------------------------------------------------------
    def tune_config(self):
        """The tune stage's TuneConfig: its YAML + the pipeline's data, output folder and MLflow."""
        from training.configuration import load_config
        from tuning.config import TuneConfig

        c = self.cfg
        derived = [f"name={SEARCH}", f"output_dir={self.run_dir}", f"trial.data.path={resolve(c.dataset)}",
                   "evaluation.enabled=false"]  # fmt: skip
        if c.heldout:
            derived.append(f"trial.validation.data_path={resolve(c.heldout)}")
        derived += [f"evaluation.config={config_file(c.evaluation.config)}"]
        derived += [f"evaluation.overrides={json.dumps(c.evaluation.overrides)}",
                    f"evaluation.candidates={c.evaluation.candidates}"]  # fmt: skip
        return load_config(TuneConfig, config_file(c.tune.config), derived + list(c.tune.overrides))

    def check_configs(self, tcfg) -> None:
        """Every stage's config, before anything runs (a bad serve config must not cost a search).

        Raises:
            ConfigError: all problems of the evaluation and serve configs at once.
        """
        from training.configuration import ConfigError
        from tuning.handoff import eval_config

        problems = []
        try:
            enabled = tcfg.model_copy(update={"evaluation": tcfg.evaluation.model_copy(update={"enabled": True})})
            eval_config(enabled, self.search_dir, self.uri, None, fetch=False)  # no dataset download to check
        except ConfigError as exc:
            problems += [f"evaluation ({self.cfg.evaluation.config}): {p}" for p in exc.problems]
        if self.cfg.serve.enabled:
            from serving.config import load_serve_args

            try:
                load_serve_args(config_file(self.cfg.serve.config), self.cfg.serve.overrides)
            except ConfigError as exc:
                problems += [f"serve ({self.cfg.serve.config}): {p}" for p in exc.problems]
        if problems:
            raise ConfigError(problems, "pipeline")

    # -- stages --------------------------------------------------------------------------------------------
    def validate(self, tcfg) -> dict[str, Any]:
        from training.data import validate_dataset
        from training.heldout import select_heldout

        report = validate_dataset(tcfg.trial.data)
        log.info("%s", report.summary())
        report.raise_if_errors()
        train, held = select_heldout(tcfg.trial, report.examples)
        return {"dataset": tcfg.trial.data.path, "images": len(train), "heldout": len(held),
                "warnings": len(report.warnings), "fingerprint": report.fingerprint()}  # fmt: skip

    def tune(self, tcfg) -> dict[str, Any]:
        from tuning.tune import TUNE_DIR, SearchInterrupted
        from tuning.tune import run as tune_run

        best_file = self.search_dir / "best.json"
        if best_file.is_file():
            best = json.loads(best_file.read_text())
            return {"skipped": True, "best": best.get("best"), "trials": best.get("trials")}
        resume = self.resume and (self.search_dir / TUNE_DIR).is_dir()
        try:
            result = tune_run(tcfg, resume=resume)  # SIGTERM in here stops Tune gracefully (tuning.tune)
        except SearchInterrupted as exc:
            raise Stopped(str(exc)) from exc
        if not result.best or not result.best.get("best"):
            metric = tcfg.search.metric
            raise StageFailed(f"no trial finished with a finite {metric}; see {self.search_dir}/results.csv")
        return {"best": result.best["best"], "trials": result.best.get("trials"), "resumed": resume}

    def evaluate(self, tcfg) -> dict[str, Any]:
        from tuning.handoff import evaluate_best

        best_file = self.search_dir / "best.json"
        summary = json.loads(best_file.read_text())
        done = summary.get("evaluation")
        # done: passed, or refused as often as this config allows (a rerun with more candidates tries again)
        if not done or not (done["passed"] or len(done.get("candidates", [None])) >= tcfg.evaluation.candidates):
            tcfg = tcfg.model_copy(update={"evaluation": tcfg.evaluation.model_copy(update={"enabled": True})})
            parent = json.loads((self.search_dir / "mlflow_parent.json").read_text())["run_id"]
            # writes best.json["evaluation"]; the next-best trials get their turn while the gate refuses
            evaluate_best(tcfg, summary, self.search_dir, self.uri, parent, tcfg.evaluation.candidates)
            summary = json.loads(best_file.read_text())
            out = {}
        else:
            out = {"skipped": True}
        ev = summary["evaluation"]
        keys = ("trial_id", "passed", "gate", "metrics", "registry", "report", "run_id", "candidates")
        return out | {k: ev.get(k) for k in keys}

    def gate(self) -> dict[str, Any]:
        ev = self.summary["stages"]["evaluate"]
        if not ev["passed"]:
            raise StageFailed(
                f"the best adapter did not pass the gate ({ev['gate']}); the champion is unchanged. "
                f"Report: {ev['report']}"
            )
        return {"gate": ev["gate"]}

    def register(self) -> dict[str, Any]:
        reg = self.summary["stages"]["evaluate"].get("registry") or {}
        if not reg.get("version"):
            raise StageFailed(
                "the adapter passed but was not registered: set registry.enabled=true in the evaluation config "
                f"(evaluation.overrides) and check the MLflow server {self.uri}"
            )
        return {"model": reg.get("model"), "version": str(reg["version"]), "alias": reg.get("alias", "champion")}

    def deploy(self) -> dict[str, Any]:
        from serving.config import load_serve_args
        from serving.deploy import deploy, http_options

        s = self.cfg.serve
        model = self.summary["stages"]["register"]["model"]
        path = config_file(s.config)
        args = load_serve_args(path, [f"tracking_uri={self.uri}", f"champion.model={model}", *s.overrides])
        http = http_options(path) | ({"port": s.port} if s.port else {})
        self.serve_args = args  # the smoke test talks to this deployment
        url = deploy(args, name=s.app_name, route_prefix=s.route_prefix, http=http, api_key=args.api_key())
        return {"url": url, "app": s.app_name, "champion": args.champion.name}

    def smoke(self) -> dict[str, Any]:
        from serving.deploy import smoke_test

        s = self.cfg.serve
        dep, reg = self.summary["stages"]["deploy"], self.summary["stages"]["register"]
        out = smoke_test(dep["url"], s.smoke_prompt, model=dep["champion"], out=self.run_dir / "smoke.png",
                         api_key=self.serve_args.api_key())  # fmt: skip
        if str(out.get("version")) != reg["version"]:
            raise StageFailed(
                f"the endpoint answered with {out.get('model')} version {out.get('version')}, not the new champion "
                f"{reg['model']}/{reg['version']}; check champion.poll_s and POST {dep['url']}/admin/reload"
            )
        return out

    # -- the run -------------------------------------------------------------------------------------------
    def _open_run(self, tcfg) -> None:
        from training.tracking import MlflowTracker, flatten, start_run

        marker = self.run_dir / "mlflow_run.json"
        experiment = self.cfg.mlflow.experiment or tcfg.trial.mlflow.experiment
        if marker.is_file():
            self.run_id = json.loads(marker.read_text())["run_id"]
        else:
            self.run_id = start_run(self.uri, experiment, f"pipeline {self.cfg.name}", {"lorafleet.kind": "pipeline"})
            marker.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri}) + "\n")
            MlflowTracker(self.uri, self.run_id).log_params(flatten(self.cfg.model_dump(mode="json")))
        if job := os.environ.get("LORAFLEET_SUBMISSION_ID"):
            # a rerun reuses the run: the latest job's id, plus one tag per job so each stays findable
            MlflowTracker(self.uri, self.run_id).set_tags({"lorafleet.submission_id": job, JOB_TAG + job: "pipeline"})

    def _check_storage(self, tcfg) -> None:
        import ray

        from cluster.storage import storage_problems
        from training.config import PreflightError

        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        paths = {"output_dir": str(self.run_dir), "tune trial.ray.storage_path": tcfg.trial.ray.storage_path}
        if problems := storage_problems(paths, nodes, self.cfg.storage.shared):
            raise PreflightError("\n  - ".join(["shared storage needed:", *problems]))

    def run(self) -> PipelineResult:
        from mlflow import MlflowClient

        from training.config import PreflightError
        from training.ray_train import init_ray

        self.uri = self.cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not self.uri or not self.uri.startswith(("http://", "https://", "databricks")):
            raise PreflightError(
                "the pipeline needs an MLflow tracking server (trials, registry and Serve share it): "
                "`lorafleet up` starts one, or set mlflow.tracking_uri / $MLFLOW_TRACKING_URI"
            )
        tcfg = self.tune_config()
        self.check_configs(tcfg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        init_ray()
        self._check_storage(tcfg)
        self._open_run(tcfg)
        tcfg.trial.mlflow.tracking_uri = self.uri
        tcfg.trial.mlflow.parent_run_id = self.run_id
        previous = signal.signal(signal.SIGTERM, self.sigterm)
        status = "FAILED"
        try:
            stages = [("validate", self.validate, tcfg), ("tune", self.tune, tcfg), ("evaluate", self.evaluate, tcfg),
                      ("gate", self.gate), ("register", self.register)]  # fmt: skip
            if self.cfg.serve.enabled:
                stages += [("deploy", self.deploy), ("smoke", self.smoke)]
            for name, fn, *args in stages[: STAGES.index(self.cfg.until) + 1]:
                self._stage(name, fn, *args)
            status = "FINISHED"
        except Stopped:
            status = "KILLED"
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.summary["status"] = status.lower()
            self._save()
            client = MlflowClient(self.uri)
            client.log_artifact(self.run_id, str(self.run_dir / SUMMARY))
            if job := os.environ.get("LORAFLEET_SUBMISSION_ID"):
                client.log_artifact(self.run_id, str(self.run_dir / SUMMARY), f"jobs/{job}")  # this job's outcome
            if (self.run_dir / "smoke.png").is_file() and status == "FINISHED":
                client.log_artifact(self.run_id, str(self.run_dir / "smoke.png"))
            client.set_terminated(self.run_id, status)
        return PipelineResult(str(self.run_dir), self.summary, self.run_id, self.uri, self.summary["stages"])


def run(cfg: PipelineConfig, *, resume: bool = False) -> PipelineResult:
    return Pipeline(cfg, resume=resume).run()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m cluster.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/pipeline.yaml")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search (Tuner.restore)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. serve.port=8001 name=try2")
    args = parser.parse_args(argv)

    from evaluation.registry import RegistryError
    from training.adapter import AdapterError
    from training.config import PreflightError
    from training.configuration import ConfigError, load_config
    from training.data import DatasetError

    try:
        cfg = load_config(PipelineConfig, config_file(args.config), args.overrides)
        result = run(cfg, resume=args.resume)
    except (ConfigError, DatasetError, PreflightError, AdapterError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StageFailed as exc:
        print(f"pipeline stopped: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Stopped:
        print("pipeline stopped by SIGTERM; finished trials and checkpoints are kept: rerun with --resume",
              file=sys.stderr)  # fmt: skip
        return EXIT_STOPPED
    for name, stage in result.stages.items():
        print(f"  {name:9s} {stage['status']:8s} {stage['seconds']:7.1f} s")
    reg, smoke = result.stages.get("register"), result.stages.get("smoke")
    if reg:
        print(f"champion: {reg['model']}/{reg['version']} (alias {reg['alias']})")
    if smoke:
        print(f"serving: {smoke['url']}  smoke image: {smoke.get('image')} ({smoke['seconds']} s)")
    print(f"pipeline.json: {Path(result.run_dir) / SUMMARY}  mlflow run {result.run_id} ({result.tracking_uri})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
