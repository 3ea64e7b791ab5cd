"""Search LoRA hyperparameters with Ray Tune + Optuna (+ASHA); every trial trains on Ray Train workers.

    python -m tuning.tune --config configs/tune.yaml
    python -m tuning.tune --config configs/tune.yaml search.num_samples=4 search.max_epochs=1   # tiny CPU run
    python -m tuning.tune --config configs/tune.yaml --resume          # finish an interrupted search
    python -m tuning.tune --config configs/tune.yaml search.algorithm=grid search.scheduler=fifo
    ray job submit --working-dir . -- python -m tuning.tune --config configs/tune.yaml \\
        trial.data.path=$PWD/data/toy-sks trial.validation.data_path=$PWD/data/toy-sks/heldout output_dir=$PWD/runs/tune

Writes ``<output_dir>/<name>/``: ``best.json`` (the handoff to evaluation and serving), ``best/adapter``,
``results.csv|json``, ``plots/*.png``, ``optuna.db`` (the study), ``tune/`` (Tune's experiment, which
``--resume`` restores) and ``trials/<trial_id>/`` (each trial's Train run, adapter and result.json).
MLflow: one parent run for the search, one child run per trial.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

from evaluation.promote import EVAL_CONFIG
from evaluation.registry import RegistryError
from training.adapter import AdapterError
from training.buckets import resolve_bucket_step, resolve_resolution
from training.cluster_state import up_mlflow
from training.config import PreflightError, TrainConfig
from training.configuration import ConfigError, load_config
from training.data import DatasetError, validate_dataset
from training.init_adapter import InitAdapterError, check_init_adapter
from training.quiet import quiet_libraries
from training.tracking import GAP_RECORD, MlflowTracker, driver_tracker, flatten, git_commit, start_run
from training.training_set import build_worker_spec, describe_epoch
from tuning.config import TuneConfig
from tuning.handoff import eval_config, evaluate_best
from tuning.progress import PROGRESS, ProgressLog
from tuning.results import TrialRecord
from tuning.space import check_points, choice_points, for_hardware, grid_points, trial_config, with_rules
from tuning.summary import finish

log = logging.getLogger("tuning.tune")
TUNE_DIR = "tune"  # Tune's experiment folder inside the run folder
CONFIG_NAME = "tune_config.json"  # the search's resolved config, checked on --resume
TRIAL_DRIVER_MEMORY = 512 * 1024**2  # bytes reserved for each trial's driver process (it imports torch)


class SearchInterrupted(RuntimeError):
    """SIGTERM (``ray job stop``) ended the search early; its state is saved and ``--resume`` continues it."""


@contextlib.contextmanager
def sigterm_stops_tune() -> Iterator[threading.Event]:
    """While Tune runs, SIGTERM does what Ctrl+C does: Tune stops the trials (each keeps its last epoch
    checkpoint) and saves the experiment, so ``Tuner.restore`` can continue. The event tells it happened."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def on_sigterm(signum, frame) -> None:
        stopped.set()
        log.warning("SIGTERM: stopping the trials and saving the search; --resume continues it")
        tune_handler = signal.getsignal(signal.SIGUSR1)  # Tune's interrupt handler while Tuner.fit runs
        if callable(tune_handler):
            tune_handler(signal.SIGUSR1, frame)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class TrialSetup:
    """What every trial gets from the driver (through the object store, not the trial's config)."""

    cfg: dict[str, Any]  # the TuneConfig, paths made absolute
    run_dir: str
    points: list[dict[str, Any]]  # grid mode: trial config {"grid_point": i} runs points[i]
    tracking_uri: str | None
    parent_run_id: str | None


@dataclass
class SearchResult:
    run_dir: str
    best: dict[str, Any] | None  # best.json's content
    records: list[TrialRecord]
    parent_run_id: str | None
    tracking_uri: str | None
    evaluation: Any = None  # evaluation.evaluate.EvalResult of the best adapter, when evaluation.enabled


def trial_name(trial_id: str, params: dict[str, Any]) -> str:
    """``<trial id> rank=16 optimizer=adamw lr=3.2e-04 epochs=8``: the id first, then the key params."""
    parts = [trial_id]
    for key, value in sorted(params.items()):
        short = key.rsplit(".", 1)[-1]
        parts.append(f"{short}={value:.2g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join(parts)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One Tune trial (Train V2 pattern): base config + this trial's overrides → ``training.train.run``
    with a ``TorchTrainer`` whose ``TuneReportCallback`` forwards every epoch's metrics to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from training.train import run as train_run

    quiet_libraries()  # this trial's process: no library noise in the job log
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = TuneConfig.model_validate(setup.cfg)
    overrides = with_rules(suggestion(config, setup.points), cfg)
    tcfg = trial_config(cfg, overrides, trial_id=trial_id, run_dir=setup.run_dir)
    tcfg.mlflow.enabled = setup.tracking_uri is not None
    tcfg.mlflow.tracking_uri = setup.tracking_uri
    tcfg.mlflow.parent_run_id = setup.parent_run_id
    tcfg.mlflow.run_name = trial_name(trial_id, overrides)
    # resume=True: a restored search continues this trial's own Train run (and MLflow run) where it stopped
    result = train_run(tcfg, resume=True, callbacks=[TuneReportCallback()])
    if not result.history:
        # the Train run had already trained its last epoch when the driver died: nothing was reported in
        # this (re)start, so hand Tune the final metrics and checkpoint Train restored
        ray.tune.report(result.metrics | {"checkpoint_path": result.checkpoint})


def suggestion(config: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any]:
    """A trial's overrides from its Tune config: the searcher's values, or a grid point by index (grid
    values may be lists, e.g. target modules, which Tune would try to resolve as nested config)."""
    return dict(points[config["grid_point"]]) if "grid_point" in config else dict(config)


def trial_dirname(trial: Any) -> str:
    return trial.trial_id  # no timestamps: names must survive a restore


def preflight(cfg: TuneConfig, run_dir: Path, resume: bool) -> list[str]:
    """Every problem found before Ray starts: data, held-out set, trial configs, the run folder."""
    problems = []
    trial = resolve_bucket_step(cfg.trial)  # buckets of the base model's granularity
    report = validate_dataset(trial.data)
    log.info("%s", report.summary())
    report.raise_if_errors()
    spec = build_worker_spec(trial, report)  # the held-out split and the class images: raise with the fix
    log.info("%s", describe_epoch(trial, spec.examples))
    points = choice_points(cfg) + cfg.search.points_to_evaluate
    if cfg.search.algorithm == "grid":
        points += grid_points(cfg)
    problems += sorted(set(check_points(cfg, points)))
    problems += TrainConfig.ray_problems(cfg.trial.model_dump(), prefix="trial.")  # trials run on Ray's workers
    if trial.lora.init_adapter:  # the adapter a continued search starts from fits every trial's LoRA
        try:
            check_init_adapter(trial)
        except InitAdapterError as exc:
            problems.append(f"trial: {exc}")
    tune_dir = run_dir / TUNE_DIR
    if resume and not tune_dir.is_dir():
        problems.append(f"--resume: no search to resume in {run_dir}; drop --resume to start it")
    saved = run_dir / CONFIG_NAME
    if resume and saved.is_file():
        before = flatten(json.loads(saved.read_text()))
        now = flatten(cfg.model_dump(mode="json"))
        if changed := sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k)):
            problems.append(
                f"--resume continues the search as it started ({saved}); these keys differ now: "
                f"{', '.join(changed[:8])}. Resume with the same config and overrides, or start a new name="
            )
    if cfg.evaluation.enabled:
        try:
            eval_config(cfg, run_dir, "http://127.0.0.1", None, fetch=False)  # the search's MLflow is not known yet
        except ConfigError as exc:
            problems += [f"evaluation ({cfg.evaluation.config}): {p}" for p in exc.problems]
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        problems.append(
            f"search {cfg.name!r} already exists in {run_dir}; pass --resume to finish it, or set name= to start anew"
        )
    return problems


def absolute_paths(cfg: TuneConfig) -> TuneConfig:
    """Trials run in Tune's trial folders: relative paths that exist here are made absolute. An unset
    ``trial.data.resolution`` becomes the base model's native size first (``resolve_resolution``): the JSON round
    trip below marks every field as set, so later stages could no longer tell "not set" from the default."""
    data = cfg.model_copy(update={"trial": resolve_resolution(cfg.trial)}).model_dump(mode="json")
    t = data["trial"]
    paths = ((t, "base_model"), (t, "pretrained_vae_model_name_or_path"), (t["data"], "path"),
             (t["data"], "class_data_dir"), (t["validation"], "data_path"), (t["lora"], "init_adapter"))  # fmt: skip
    for holder, key in paths:
        if holder[key] and not Path(holder[key]).is_absolute() and Path(holder[key]).exists():
            holder[key] = str(Path(holder[key]).resolve())
    return TuneConfig.model_validate(data)


def open_parent(cfg: TuneConfig, run_dir: Path, uri: str | None, notes: list[str]) -> str | None:
    """The study's MLflow run, created before any trial (reopened on --resume)."""
    if uri is None:
        return None
    marker = run_dir / "mlflow_parent.json"
    if marker.is_file():
        return json.loads(marker.read_text())["run_id"]
    tags = {"lorafleet.kind": "search", "search.algorithm": cfg.search.algorithm}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    # trial.mlflow.parent_run_id (e.g. the pipeline's run) makes the study a child run; trials get the study
    run_id = start_run(uri, cfg.trial.mlflow.experiment, cfg.label or cfg.name, tags, cfg.trial.mlflow.parent_run_id)
    params = flatten(cfg.search.model_dump(mode="json"), "search.") | flatten(
        cfg.trial.model_dump(mode="json"), "trial."
    )
    # run() ends the study's run; this exit only sends (or states) what is logged here
    with MlflowTracker(uri, run_id, owns_run=False, local_record=run_dir / GAP_RECORD) as tracker:
        tracker.log_params(params)
        try:
            # how this search's adapters are evaluated: `lorafleet promote --trial … --epoch …` evaluates a picked
            # checkpoint the same way (evaluation.promote)
            ecfg = eval_config(cfg, run_dir, uri, run_id, fetch=False)
            (run_dir / EVAL_CONFIG).write_text(json.dumps(ecfg.model_dump(mode="json"), indent=2) + "\n")
            tracker.log_artifact(run_dir / EVAL_CONFIG)
        except ConfigError as exc:  # checked in the preflight when the search evaluates; here only a convenience
            log.warning("evaluation config not logged (promote will need --config): %s", exc)
        space = {"space": cfg.model_dump(mode="json")["space"], "grid": cfg.grid, "dropped_on_this_hardware": notes}
        (run_dir / "search_space.json").write_text(json.dumps(space, indent=2) + "\n")
        tracker.log_artifact(run_dir / "search_space.json")
    marker.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}) + "\n")
    return run_id


def max_concurrent(cfg: TuneConfig, resources: dict[str, float], available: dict[str, float] | None = None) -> int:
    """Trials that fit at once: cluster CPUs (or GPUs) ÷ one trial's Train workers — counting only what is free
    when the search starts (``available``: ``ray.available_resources()``), at least one trial when the cluster
    could hold it. Serve replicas of an earlier pipeline hold CPUs for good; a trial whose workers find none free
    fails after Ray Train's 60 s worker-group start-up timeout instead of waiting.

    Raises:
        PreflightError: not even one trial fits the whole cluster.
    """
    r = cfg.trial.ray

    def fitting(res: dict[str, float]) -> int:
        n = int(res.get("CPU", 0) // (r.num_workers * r.cpus_per_worker))
        return min(n, int(res.get("GPU", 0) // r.num_workers)) if r.use_gpu else n

    fits = fitting(resources)
    if available is not None and fits >= 1 and (free := max(1, fitting(available))) < fits:
        log.info("%d of the cluster's %d trial slots are held by other work (Serve replicas, jobs): up to %d trials "
                 "at once", fits - free, fits, free)  # fmt: skip
        fits = free
    if fits < 1:
        raise PreflightError(
            f"one trial needs {r.num_workers} workers × {r.cpus_per_worker} CPU"
            f"{' + 1 GPU each' if r.use_gpu else ''}; the cluster has {resources.get('CPU', 0)} CPUs and "
            f"{resources.get('GPU', 0)} GPUs. Lower trial.ray.num_workers / cpus_per_worker"
        )
    wanted = cfg.search.max_concurrent_trials
    if wanted and wanted > fits:
        log.warning("search.max_concurrent_trials=%d but only %d trials fit; extra trials will wait", wanted, fits)
    return wanted or fits


def max_epochs(cfg: TuneConfig) -> int:
    """The longest a trial can train: ASHA's max_t."""
    spec = cfg.space.get("train.epochs")
    if cfg.search.algorithm == "grid" and "train.epochs" in cfg.grid:
        longest = max(cfg.grid["train.epochs"])
    elif spec is not None:
        longest = int(max(spec.values) if spec.type == "choice" else spec.high)
    else:
        longest = cfg.trial.train.epochs
    return min(longest, cfg.search.max_epochs or longest)


def build_tuner(cfg: TuneConfig, setup: TrialSetup, run_dir: Path, concurrency: int, resume: bool):
    """The ``Tuner`` (or the restored one): searcher, ASHA, concurrency, trial resources."""
    import optuna
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from tuning.searcher import StudySearch
    from tuning.space import OptunaSpace

    # the trial function only waits on its TorchTrainer: no CPU (those go to the Train workers), but Tune
    # needs a non-empty bundle, and memory is what the trial process really holds
    resources = {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, setup=setup), resources)
    tune_dir = run_dir / TUNE_DIR
    if resume:
        log.info("restoring the search from %s (finished trials are not rerun)", tune_dir)
        return ray.tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=False)
    s = cfg.search
    param_space: dict[str, Any] = {}
    if s.algorithm == "grid":
        searcher = None  # Tune's BasicVariantGenerator, limited to max_concurrent_trials
        param_space = {"grid_point": ray.tune.grid_search(list(range(len(setup.points))))}
        num_samples = 1
        log.info("grid: %d trials", len(setup.points))
    else:
        if s.algorithm == "optuna":
            sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.startup_trials)
        else:
            sampler = optuna.samplers.RandomSampler(seed=s.seed)
        storage = optuna.storages.RDBStorage(f"sqlite:///{run_dir / 'optuna.db'}")
        searcher = StudySearch(
            space=OptunaSpace(cfg),
            metric=s.metric,
            mode=s.mode,
            points_to_evaluate=[dict(p) for p in s.points_to_evaluate] or None,
            sampler=sampler,
            study_name=cfg.name,
            storage=storage,
        )
        num_samples = s.num_samples
    if s.scheduler == "asha":
        max_t = max_epochs(cfg)
        grace = min(s.grace_period, max_t)  # a 1-epoch budget leaves ASHA nothing to stop
        scheduler = ASHAScheduler(
            time_attr="epoch", max_t=max_t, grace_period=grace, reduction_factor=s.reduction_factor
        )
    else:
        scheduler = FIFOScheduler()
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=concurrency,
            time_budget_s=s.time_budget_s,
            trial_name_creator=trial_dirname,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=ray.tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(run_dir),
            failure_config=ray.tune.FailureConfig(max_failures=0, fail_fast=False),  # a failed trial stays failed
            verbose=0,  # Tune's 9-line status table every 30 s made most of a job's log: one line per event instead
            callbacks=[TrialProgress(cfg, setup.points, len(setup.points) or num_samples, run_dir / PROGRESS)],
        ),
    )


class TrialProgress(Callback):
    """The search's progress as one log line per trial event: started (its values), ended (completed or stopped
    early by the scheduler, with the metric), failed (the error's last line); and as JSON lines, one per trial
    event and per epoch, in ``progress`` (``tuning.progress``: what a fine-tuning job's events show live)."""

    def __init__(self, cfg: TuneConfig, points: list[dict[str, Any]], total: int, progress: Path):
        self.cfg, self.points, self.total = cfg, points, total
        self.progress = ProgressLog(progress)
        self.started = 0
        self.last: dict[str, dict[str, Any]] = {}
        self.best: float | None = None

    def _params(self, trial) -> dict[str, Any]:
        return with_rules(suggestion(trial.config or {}, self.points), self.cfg)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started += 1
        log.info("trial %s started (%d of %d): %s", trial.trial_id, self.started, self.total,
                 trial_name("", self._params(trial)).strip())  # fmt: skip
        self.progress.write({"event": "start", "trial_id": trial.trial_id, "params": self._params(trial),
                             "n": self.started, "total": self.total})  # fmt: skip

    def _planned(self, trial) -> int:
        return int(self._params(trial).get("train.epochs", self.cfg.trial.train.epochs))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.last[trial.trial_id] = result
        if "epoch" in result:  # training.loop's per-epoch report, forwarded by Train's TuneReportCallback
            metric = self.cfg.search.metric
            line = {"event": "epoch", "trial_id": trial.trial_id, "epoch": int(result["epoch"]),
                    "planned_epochs": self._planned(trial), "loss": result.get("loss"),
                    "time_total_s": round(float(result.get("time_total_s", 0.0)), 2)}  # fmt: skip
            if metric in result:
                line[metric] = result[metric]
            self.progress.write(line)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = self.last.get(trial.trial_id, {})
        metric, mode = self.cfg.search.metric, self.cfg.search.mode
        value = result.get(metric)
        planned = self._planned(trial)
        epochs = int(result.get("epoch", 0))
        how = "completed" if epochs >= planned else "stopped early by the scheduler"
        self.progress.write({"event": "end", "trial_id": trial.trial_id, "status": "completed" if epochs >= planned
                             else "stopped", "epochs": epochs, "planned_epochs": planned, "metric": metric,
                             "value": value})  # fmt: skip
        if value is not None and (self.best is None or (value < self.best if mode == "min" else value > self.best)):
            self.best = value
        shown = "-" if value is None else f"{value:.4g}"
        log.info("trial %s %s after %d/%d epochs: %s %s (best so far %s)", trial.trial_id, how, epochs, planned,
                 metric, shown, "-" if self.best is None else f"{self.best:.4g}")  # fmt: skip

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        log.warning("trial %s failed; its error is in %s", trial.trial_id, trial.local_path or "the trial folder")
        self.progress.write({"event": "error", "trial_id": trial.trial_id})


def records_of(results, cfg: TuneConfig, run_dir: Path, points: list[dict[str, Any]]) -> list[TrialRecord]:
    """Tune's ``ResultGrid`` → ``TrialRecord``s (status, epochs, metric history, MLflow child run)."""
    out = []
    metric = cfg.search.metric
    for result in results:
        trial_id = Path(result.path).name
        suggested = suggestion(result.config or {}, points)
        params = with_rules(suggested, cfg)
        planned = int(params.get("train.epochs", cfg.trial.train.epochs))
        frame = result.metrics_dataframe
        history = [float(v) for v in frame[metric]] if frame is not None and metric in frame else []
        last = result.metrics or {}
        epochs = int(last.get("epoch", 0))
        status = "failed" if result.error is not None else "completed" if epochs >= planned else "stopped"
        marker = run_dir / "trials" / trial_id / "mlflow_run.json"
        run_id = json.loads(marker.read_text())["run_id"] if marker.is_file() else None
        out.append(
            TrialRecord(
                trial_id=trial_id,
                params=params,
                suggested=suggested,
                status=status,
                epochs=epochs,
                planned_epochs=planned,
                metric=last.get(metric) if status != "failed" else None,
                best_metric=(min if cfg.search.mode == "min" else max)(history) if history else None,
                time_s=float(last.get("time_total_s", 0.0)),
                checkpoint=last.get("checkpoint_path"),
                run_id=run_id,
                error=str(result.error).strip().splitlines()[-1][:500] if result.error is not None else None,
                history=history,
                ended_at=float(last.get("timestamp", 0.0)),
            )
        )
    return sorted(out, key=lambda r: r.trial_id)


def run(cfg: TuneConfig, *, resume: bool = False) -> SearchResult:
    """Validate → preflight → MLflow parent run → Tuner.fit (or restore) → results, plots, best adapter."""
    cfg = absolute_paths(cfg)  # first: for_hardware's round trip would mark data.resolution as set
    cfg, notes = for_hardware(cfg)
    for note in notes:
        log.warning("%s", note)
    run_dir = (Path(cfg.output_dir).expanduser() / cfg.name).resolve()
    if problems := preflight(cfg, run_dir, resume):
        raise PreflightError("cannot start the search:\n  - " + "\n  - ".join(problems))
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run_dir / CONFIG_NAME).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")

    from training.mlflow_server import start_mlflow_server
    from training.ray_train import check_resources, init_ray

    server = None
    uri = None
    if cfg.trial.mlflow.enabled:
        uri = cfg.trial.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or up_mlflow()
        if not uri or uri.startswith("sqlite:"):
            # concurrent trials must not share one SQLite file: serve it (loopback) for the search's duration
            server = start_mlflow_server(Path(cfg.output_dir).expanduser() / "mlflow")
            uri = server.uri
            log.warning("no MLflow tracking server configured; started %s for this search (state in %s)", uri,
                        server.state_dir)  # fmt: skip
    try:
        parent = open_parent(cfg, run_dir, uri, notes)
        # the study's run ends with the block: FINISHED (FAILED when no trial finished), FAILED on an error,
        # KILLED when stopped — a resumed search sets it again at its own end
        with driver_tracker(uri, parent, local_record=run_dir / GAP_RECORD) as study:
            init_ray()
            import ray

            check_resources(cfg.trial)
            concurrency = max_concurrent(cfg, ray.cluster_resources(), ray.available_resources())
            log.info("up to %d trials at once; MLflow %s parent run %s", concurrency, uri, parent)
            points = grid_points(cfg) if cfg.search.algorithm == "grid" else []
            setup = TrialSetup(cfg.model_dump(mode="json"), str(run_dir), points, uri, parent)
            with sigterm_stops_tune() as stopped:
                results = build_tuner(cfg, setup, run_dir, concurrency, resume).fit()
            if stopped.is_set():
                study.end_status = "KILLED"
                raise SearchInterrupted(
                    f"the search was stopped (SIGTERM); its state is in {run_dir}: rerun with --resume"
                )
            records = records_of(results, cfg, run_dir, points)
            store = f"sqlite:///{server.state_dir / 'mlflow.db'}" if server else None
            summary = finish(cfg, records, run_dir, uri, store, study)
            # before the server stops: a search-scoped server holds the registry too
            evaluated = (
                evaluate_best(cfg, summary, run_dir, uri, parent, cfg.evaluation.candidates, study)
                if cfg.evaluation.enabled
                else None
            )
    finally:
        if server is not None:
            server.stop()
    return SearchResult(str(run_dir), summary, records, parent, uri, evaluated)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tuning.tune", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/tune.yaml")
    parser.add_argument("--resume", action="store_true", help="restore an interrupted search (Tuner.restore)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. search.num_samples=4 trial.train.lr=1e-4")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_config(TuneConfig, args.config, args.overrides)
        result = run(cfg, resume=args.resume)
    except (ConfigError, DatasetError, PreflightError, AdapterError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SearchInterrupted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 3
    best = result.best["best"] if result.best else None
    print(f"trials: {json.dumps(result.best['trials'])}  trial-epochs: {result.best['trial_epochs']}")
    for r in result.records:
        value = f"{r.metric:.5f}" if r.metric is not None else "-"
        print(f"  {r.trial_id}  {r.status:9s} {value:>9s}  epochs {r.epochs}/{r.planned_epochs}  {r.params}")
    if best is None:
        print("no trial finished with a finite metric; see results.csv", file=sys.stderr)
        return 1
    print(f"best: {best['trial_id']} {result.best['metric']}={best['value']:.5f} {best['overrides']}")
    print(f"adapter: {best['adapter']}")
    print(f"best.json: {Path(result.run_dir) / 'best.json'}")
    if result.evaluation is not None:
        ev = result.evaluation
        print(f"evaluation: {ev.gate.summary()}; registry: {ev.registry}; report: {ev.out_dir}/report.html")
    if result.parent_run_id:
        print(f"mlflow: parent run {result.parent_run_id} ({result.tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
