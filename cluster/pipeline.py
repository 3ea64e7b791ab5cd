"""The end-to-end job: validate dataset → tune → evaluate the best adapter → gate → register (alias champion)
→ deploy or refresh the Serve application → smoke-test its HTTP endpoint.

    python -m cluster.pipeline --config configs/pipeline.yaml
    python -m cluster.pipeline --config configs/pipeline.yaml 'tune.overrides=["search.num_samples=2"]' until=tune
    lorafleet submit pipeline --config configs/pipeline.yaml --follow      # the same as a Ray job
    python -m cluster.pipeline --config configs/pipeline.yaml --resume     # after `lorafleet stop` (SIGTERM)
    lorafleet submit pipeline --config configs/pipeline-sdxl.yaml dataset=s3://bucket/my-photos   # an SDXL base

Before validate, with ``caption.enabled`` (a fine-tuning job on an upload without captions sets it), the ``caption``
stage captions the dataset's images that have none (``training.captioning.fill``; the captioner is
``caption.captioner``: auto = toy for a toy-world base model, BLIP otherwise): a folder of bare images then trains.

The base model is the tune config's ``trial.base_model``, of any family (SD 1.x/2.x, SDXL; docs/model-families.md):
the trials train on it, the evaluation loads it from the adapter and renders at the trials' size, and the Serve
application is deployed with it as its ``base_model``.

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

from pydantic import BaseModel

from cluster.config import STAGES, PipelineConfig
from serving.config import PROJECT_ROOT
from training.tracking import GAP_RECORD, NullTracker, driver_tracker

log = logging.getLogger("cluster.pipeline")
SUMMARY = "pipeline.json"
CAPTIONS_SHOWN = 100  # captions the caption stage records in pipeline.json (all of them go to dataset.json)
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


def model_path(name: str) -> str:
    """A model folder (made absolute) when it exists here or inside this checkout (the toy models: the job's working
    dir), else ``name`` as given (a hub id)."""
    p = Path(name).expanduser()
    for candidate in (p, PROJECT_ROOT / p):
        if candidate.exists():
            return str(candidate.resolve())
    return name


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


# keys of the tune config the pipeline sets from its own fields: overriding them in tune.overrides would train on
# one thing and evaluate or name another
OWNED = {
    "name": "search folder (set name=)", "output_dir": "output folder (set output_dir=)",
    "trial.data.path": "dataset (set dataset=)", "trial.data.trigger": "trigger (set trigger=)",
    "trial.validation.data_path": "held-out folder (set heldout=)", "trial.validation.holdout": "split (set holdout=)",
    "trial.mlflow.experiment": "experiment (set mlflow.experiment=)", "evaluation.overrides": "evaluation (set "
    "evaluation.overrides=)", "evaluation.config": "evaluation config (set evaluation.config=)",
}  # fmt: skip


def pipeline_name(cfg: PipelineConfig) -> str:
    """``name``, else the dataset's folder name (``data/ohwx`` → ``ohwx``)."""
    from training.names import dataset_name, slug

    return slug(cfg.name) if cfg.name else dataset_name(resolve(cfg.dataset))


def evaluation_model_name(cfg: PipelineConfig) -> str | None:
    """The registered model name ``evaluation.overrides`` sets (``registry.model_name=…``, the last one wins, as it
    does when the evaluation config is loaded), or None: what the register stage writes to, e.g. a fine-tuning job's
    ``<tenant>--<suffix>`` (serving/finetune/jobs.py)."""
    named = [o.split("=", 1)[1] for o in cfg.evaluation.overrides if o.startswith("registry.model_name=")]
    return named[-1].strip().strip("\"'") if named else None


class Pipeline:
    def __init__(self, cfg: PipelineConfig, *, resume: bool = False):
        from training.names import registered_model_name

        self.cfg, self.resume = cfg, resume
        self.name = pipeline_name(cfg)
        self.model_name = evaluation_model_name(cfg) or registered_model_name(self.name)
        self.experiment = cfg.mlflow.experiment or f"lorafleet-{self.name}"
        self.run_dir = Path(resolve(cfg.output_dir)) / self.name
        self.search_dir = self.run_dir / SEARCH
        self.summary: dict[str, Any] = {"name": self.name, "stages": {}}
        previous = self.run_dir / SUMMARY
        # how each stage ended last time: a stage that failed or stopped is run again, never skipped
        self.previous = json.loads(previous.read_text()).get("stages", {}) if previous.is_file() else {}
        self.derived: dict[str, Any] = {}  # what the validate stage read from the dataset (trigger, held-out set)
        self.uri: str | None = None
        self.run_id: str | None = None
        self.tracker = NullTracker()  # the run's tracker while run() runs (its exit ends the MLflow run)
        self.serve_args = None  # the deploy stage's ServeArgs
        self.sigterm = _SigTerm()

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _save(self) -> None:
        (self.run_dir / SUMMARY).write_text(json.dumps(self.summary, indent=2, default=str) + "\n")

    def _stage(self, name: str, fn, *args) -> Any:
        """Run one stage: time it, record its outcome in pipeline.json and on the MLflow run."""
        self.sigterm.check()
        log.info("stage %s …", name)
        started = time.monotonic()
        record: dict[str, Any] = {"status": "running"}
        self.summary["stages"][name] = record
        self._save()  # the stage's start is visible at once (a fine-tuning job's events show it while it runs)
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
            self.tracker.log_metrics({f"stage_seconds.{name}": record["seconds"]}, step=0)
            self.tracker.set_tags({f"stage.{name}": record["status"]})
            log.info("stage %s: %s (%.1f s)", name, record["status"], record["seconds"])

    # -- configs -------------------------------------------------------------------------------------------
    def heldout_folder(self) -> str | None:
        """``heldout``, else ``<dataset>/heldout`` when that folder exists (checked on a local dataset or, once the
        validate stage mirrored it, on the mirror), else None: images are held out of the dataset instead."""
        if self.cfg.heldout:
            return resolve(self.cfg.heldout)
        if "heldout" in self.derived:
            return self.derived["heldout"]
        dataset = resolve(self.cfg.dataset)
        if "://" not in dataset and (Path(dataset) / "heldout").is_dir():
            return str(Path(dataset) / "heldout")
        return None

    def tune_config(self):
        """The tune stage's TuneConfig: its YAML + the pipeline's data, names, output folder and MLflow, and — once
        the validate stage has read the dataset — its trigger, held-out set and sample prompts."""
        from training.configuration import ConfigError, load_config
        from tuning.config import TuneConfig

        c, d = self.cfg, self.derived
        owned = [f"tune.overrides: {o.split('=')[0]} is the pipeline's own {OWNED[o.split('=')[0].strip()]}"
                 for o in c.tune.overrides if o.split("=")[0].strip() in OWNED]  # fmt: skip
        if c.heldout and "://" not in c.heldout and not Path(resolve(c.heldout)).is_dir():
            owned.append(f"heldout={c.heldout}: no such folder (a folder of held-out images and captions; or drop "
                         "heldout= to hold out `holdout` images of the dataset)")  # fmt: skip
        if owned:
            raise ConfigError(owned, "pipeline")
        derived = [f"name={SEARCH}", f"label={self.name} search", f"output_dir={self.run_dir}",
                   f"trial.data.path={resolve(c.dataset)}", f"trial.mlflow.experiment={self.experiment}",
                   "evaluation.enabled=false"]  # fmt: skip
        if heldout := self.heldout_folder():
            derived += [f"trial.validation.data_path={heldout}", "trial.validation.holdout=0"]
        else:
            derived += ["trial.validation.data_path=null", f"trial.validation.holdout={c.holdout}"]
        if d.get("trigger"):
            derived.append(f"trial.data.trigger={json.dumps(d['trigger'])}")  # quoted: `yes` or `123` stays text
        if d.get("sample_prompts") is not None:
            derived += [f"trial.validation.prompts={json.dumps(d['sample_prompts'])}",
                        f"trial.validation.every_n_epochs={c.samples.every_n_epochs}",
                        f"trial.validation.steps={c.samples.steps}", "trial.validation.log_adapters=true"]  # fmt: skip
        evaluation = [f"registry.model_name={self.model_name}"] + (
            [f"trigger={json.dumps(d['trigger'])}"] if d.get("trigger") else []
        )
        derived += [f"evaluation.config={config_file(c.evaluation.config)}",
                    f"evaluation.overrides={json.dumps(evaluation + list(c.evaluation.overrides))}",
                    f"evaluation.candidates={c.evaluation.candidates}"]  # fmt: skip
        return load_config(TuneConfig, config_file(c.tune.config), derived + list(c.tune.overrides))

    def check_configs(self, tcfg) -> None:
        """Every stage's config, before anything runs (a bad serve config must not cost a search).

        Raises:
            ConfigError: all problems of the evaluation and serve configs at once.
        """
        from training.configuration import ConfigError
        from tuning.handoff import eval_config

        problems = [f"serve.overrides: {o.split('=')[0].strip()} is the search's base model (set trial.base_model in "
                    f"the tune config, {self.cfg.tune.config}): the Serve replicas serve the base the adapter learned"
                    for o in self.cfg.serve.overrides if o.split("=")[0].strip() == "base_model"]  # fmt: skip
        try:
            enabled = tcfg.model_copy(update={"evaluation": tcfg.evaluation.model_copy(update={"enabled": True})})
            eval_config(enabled, self.search_dir, self.uri, None, fetch=False)  # no dataset download to check
        except ConfigError as exc:
            problems += [f"evaluation ({self.cfg.evaluation.config}): {p}" for p in exc.problems]
        if self.cfg.serve.enabled:
            from serving.config import load_serve_args

            try:
                load_serve_args(config_file(self.cfg.serve.config), self.serve_overrides(tcfg))
            except ConfigError as exc:
                problems += [f"serve ({self.cfg.serve.config}): {p}" for p in exc.problems]
        if problems:
            raise ConfigError(problems, "pipeline")

    def serve_overrides(self, tcfg, *first: str) -> list[str]:
        """The serve stage's overrides: ``first`` (the pipeline's own), the base model the search trains on — one
        replica serves one base model, of any family, and it must be the adapters' — then ``serve.overrides``."""
        from training.adapter import portable_model_name

        return [*first, f"base_model={portable_model_name(tcfg.trial.base_model)}", *self.cfg.serve.overrides]

    def caption_config(self, tcfg):
        """The caption stage's ``CaptionConfig``: ``caption.*`` with the search's base model (auto picks the toy
        captioner for a toy-world model, BLIP for others) and the pipeline's trigger.

        Raises:
            ConfigError: no trigger, a dataset URI, or a setting CaptionConfig refuses (named ``caption.<key>``).
        """
        from training.captioning import CaptionConfig
        from training.configuration import ConfigError, validate_values

        c = self.cfg.caption
        problems = []
        if not self.cfg.trigger:
            problems.append("caption.enabled=true needs trigger=<word>: the captions it writes carry the trigger "
                            "(without captions there is nothing to detect it from)")  # fmt: skip
        if "://" in self.cfg.dataset:
            problems.append(f"caption.enabled=true captions a local folder, not {self.cfg.dataset}: caption it "
                            "with `lorafleet caption DIR` and upload the captions with the images")  # fmt: skip
        if problems:
            raise ConfigError(problems, "pipeline")

        class Args(BaseModel):  # problems are named as in the pipeline config: caption.device
            caption: CaptionConfig

        values = c.model_dump(exclude={"enabled"}) | {"base_model": model_path(tcfg.trial.base_model),
                                                      "trigger": self.cfg.trigger}  # fmt: skip
        ccfg = validate_values(Args, {"caption": values}, source="pipeline").caption
        return ccfg.model_copy(update={"model": model_path(ccfg.resolved_model())})

    # -- stages --------------------------------------------------------------------------------------------
    def caption(self, ccfg) -> dict[str, Any]:
        """Caption the dataset's images that have none (``training.captioning.fill``); images with a caption keep
        theirs. Returns the stage's record: the captioner, counts, and up to ``CAPTIONS_SHOWN`` captions."""
        from training.captioning.fill import CaptionError, fill_missing_captions
        from training.configuration import ConfigError

        try:
            done = fill_missing_captions(resolve(self.cfg.dataset), ccfg)
        except CaptionError as exc:
            raise ConfigError([str(exc)], "dataset") from exc
        except (FileNotFoundError, ValueError) as exc:  # the captioner's model or device: the message names the key
            raise ConfigError([str(exc)], "pipeline") from exc
        self.derived["captions"] = done.captions  # into dataset.json by the validate stage
        log.info("captioned %d image(s) with the %s captioner; %d kept theirs", len(done.captions),
                 ccfg.resolved_captioner(), done.kept)  # fmt: skip
        model = Path(ccfg.resolved_model())
        if model.is_relative_to(PROJECT_ROOT):  # the checkout's own model: no server path in a job's events
            model = model.relative_to(PROJECT_ROOT)
        return {"skipped": not done.captions, "captioner": ccfg.resolved_captioner(), "model": str(model),
                "captioned": len(done.captions), "kept": done.kept, "format": done.format,
                "captions": done.captions[:CAPTIONS_SHOWN]}  # fmt: skip

    def validate(self, tcfg) -> dict[str, Any]:
        """Every file of the dataset; then what the rest of the pipeline reads from it: the trigger (detected from
        the captions unless ``trigger`` is set, with its evidence), the held-out set, the sample and smoke prompts."""
        from evaluation.suite import build_suite
        from training.buckets import resolve_bucket_step
        from training.captions import caption_words, choose_trigger, load_tokenizer
        from training.configuration import ConfigError
        from training.data import validate_dataset
        from training.heldout import select_heldout
        from training.remote import is_uri, local_copy
        from training.training_set import check_caption_lengths, run_fingerprint, validate_class_images

        data = resolve_bucket_step(tcfg.trial).data  # aspect-ratio buckets of the base model's granularity
        report = validate_dataset(data.model_copy(update={"trigger": None}))  # the trigger is not known yet
        log.info("%s", report.summary())
        report.raise_if_errors()
        tokenizer = load_tokenizer(tcfg.trial.base_model)
        choice = choose_trigger([e.caption for e in report.instances], tokenizer,
                                configured=self.cfg.trigger, instance_prompt=data.instance_prompt)  # fmt: skip
        log.info("%s", choice.describe())
        if not self.cfg.heldout and is_uri(self.cfg.dataset) and (local_copy(data.path) / "heldout").is_dir():
            self.derived["heldout"] = f"{self.cfg.dataset.rstrip('/')}/heldout"  # the mirror has one: so has the URI
        self.derived["trigger"] = choice.trigger
        tcfg = self.tune_config()
        check_caption_lengths(tcfg.trial, report, tokenizer)  # the trigger past the token limit: never trained
        train, held = select_heldout(tcfg.trial, report.examples)
        concept = [e for e in train if not e.prior]  # class images (prior preservation) lack the trigger by design
        if len(concept) < data.min_images:
            where = "heldout=" if self.cfg.heldout else f"holdout={self.cfg.holdout}"
            left = f"{where} leaves {len(concept)} of {len(report.instances)} images to train on"
            raise ConfigError([f"{left}, fewer than data.min_images={data.min_images}: lower holdout or add images"],
                              "pipeline")  # fmt: skip
        missing = [e.path.name for e in concept if choice.trigger.lower() not in caption_words(e.caption)]
        try:
            suite = build_suite([e.caption for e in concept], [e.caption for e in held], choice.trigger)
        except ValueError as exc:  # captions the suite cannot use (the trigger alone, …): a data problem
            raise ConfigError([f"the evaluation suite cannot be built from the captions: {exc}"], "dataset") from exc
        classes = validate_class_images(resolve_bucket_step(tcfg.trial))  # after the trigger, split and suite
        fingerprint = run_fingerprint(report, classes)  # the class images change the model too
        self._same_dataset(fingerprint)
        prompts = [p.prompt for p in suite.prompts]
        self.derived |= {"sample_prompts": prompts[: self.cfg.samples.prompts], "smoke_prompt": prompts[0]}
        facts = {"dataset": self.cfg.dataset, "name": self.name, "registered_model": self.model_name,
                 "trigger": choice.trigger, "trigger_source": choice.source, "trigger_evidence": choice.evidence,
                 "captions_without_trigger": missing, "images": len(train), "heldout": len(held),
                 "heldout_from": tcfg.trial.validation.data_path or f"{tcfg.trial.validation.holdout} held out of "
                 "the dataset", "suite_prompts": prompts, "fingerprint": fingerprint,
                 "class_images": len(classes.examples) if classes else 0,
                 "prior_loss_weight": tcfg.trial.train.prior_loss_weight if classes else None,
                 "auto_captions": self.derived.get("captions", [])}  # fmt: skip
        (self.run_dir / "dataset.json").write_text(json.dumps(facts, indent=2, default=str) + "\n")
        self.tracker.set_tags({"lorafleet.trigger": choice.trigger, "lorafleet.trigger_evidence": choice.describe(),
                               "lorafleet.registered_model": self.model_name})  # fmt: skip
        self.tracker.log_artifact(self.run_dir / "dataset.json")
        return {"dataset": tcfg.trial.data.path, "images": len(train), "heldout": len(held),
                "trigger": choice.trigger, "trigger_evidence": choice.describe(), "warnings": len(report.warnings),
                "fingerprint": fingerprint, "class_images": len(classes.examples) if classes else 0}  # fmt: skip

    def _same_dataset(self, fingerprint: str) -> None:
        """Refuse to reuse this run folder's results for a different dataset: two datasets that derive the same
        name (or one that changed since) would otherwise skip the search and serve the other one's adapter."""
        from training.configuration import ConfigError

        seen = self.run_dir / "dataset.json"
        done = (self.search_dir / "best.json").is_file()
        if not seen.is_file() or not done:
            return
        before = json.loads(seen.read_text()).get("fingerprint")
        if before and before != fingerprint:
            raise ConfigError([f"{self.run_dir} holds a search of a different dataset (fingerprint {before[:12]}, "
                               f"now {fingerprint[:12]}: other images or captions); set name= to a new name, or "
                               f"remove that folder to start over"], "pipeline")  # fmt: skip

    def tune(self, tcfg) -> dict[str, Any]:
        from tuning.tune import TUNE_DIR, SearchInterrupted
        from tuning.tune import run as tune_run

        best_file = self.search_dir / "best.json"
        best = json.loads(best_file.read_text()) if best_file.is_file() else {}
        if best.get("best"):
            return {"skipped": True, "best": best["best"], "trials": best.get("trials")}
        failed = best_file.is_file() or self.previous.get("tune", {}).get("status") == "failed"
        if failed and self.search_dir.is_dir() and not self.resume:
            # the last search ended without a usable trial: it is run again, from scratch, the old one kept aside
            n = 1 + sum(1 for _ in self.run_dir.glob(f"{SEARCH}.failed-*"))
            aside = self.run_dir / f"{SEARCH}.failed-{n}"
            self.search_dir.rename(aside)
            log.warning("the previous search failed; it is kept in %s and the search starts again", aside)
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
        summary = json.loads(best_file.read_text()) if best_file.is_file() else {}
        if not summary.get("best"):
            raise StageFailed(f"the search has no adapter to evaluate; see {self.search_dir}/results.csv")
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
            candidates = ev.get("candidates") or [{"trial_id": ev.get("trial_id"), "gate": ev["gate"]}]
            tried = len(candidates)
            verdicts = "; ".join(f"candidate {i} (trial {c.get('trial_id')}): {c.get('gate')}"
                                 for i, c in enumerate(candidates, start=1))  # fmt: skip
            raise StageFailed(
                f"no adapter passed the gate — {verdicts}; the champion is unchanged. "
                f"Report: {ev['report']}. A rerun with evaluation.candidates={tried + 1} evaluates the next-best "
                f"trial; `lorafleet promote {self.model_name} --trial ID --epoch N` one you picked from the samples"
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

    def deploy(self, tcfg) -> dict[str, Any]:
        from serving.config import load_serve_args
        from serving.deploy import deploy, http_options

        s = self.cfg.serve
        model = self.summary["stages"]["register"]["model"]
        path = config_file(s.config)
        args = load_serve_args(path, self.serve_overrides(tcfg, f"tracking_uri={self.uri}", f"champion.model={model}"))
        # every registered model keeps being served under its own name; `champion` is this pipeline's
        http = http_options(path) | ({"port": s.port} if s.port else {})
        self.serve_args = args  # the smoke test talks to this deployment
        url = deploy(args, name=s.app_name, route_prefix=s.route_prefix, http=http, api_key=args.api_key())
        return {"url": url, "app": s.app_name, "champion": args.champion.name}

    def smoke(self) -> dict[str, Any]:
        from serving.deploy import smoke_test

        s = self.cfg.serve
        dep, reg = self.summary["stages"]["deploy"], self.summary["stages"]["register"]
        prompt = s.smoke_prompt or self.derived["smoke_prompt"]
        # a new challenger (evaluation registry.promote_to=challenger) is asked for by its version: the champion
        # stays what it was, and the canary sends it only canary.share of the champion's requests
        challenger = reg.get("alias") == "challenger"
        model = f"{reg['model']}/{reg['version']}" if challenger else dep["champion"]
        out = smoke_test(dep["url"], prompt, model=model, out=self.run_dir / "smoke.png",
                         api_key=self.serve_args.api_key())  # fmt: skip
        if str(out.get("version")) != reg["version"]:
            raise StageFailed(
                f"the endpoint answered with {out.get('model')} version {out.get('version')}, not the new "
                f"{'challenger' if challenger else 'champion'} {reg['model']}/{reg['version']}; check "
                f"champion.poll_s and POST {dep['url']}/admin/reload"
            )
        return out

    # -- the run -------------------------------------------------------------------------------------------
    def _open_run(self) -> bool:
        """Create the pipeline's MLflow run, or reopen this run folder's; True when it is new."""
        from training.tracking import start_run

        marker = self.run_dir / "mlflow_run.json"
        if marker.is_file():
            self.run_id = json.loads(marker.read_text())["run_id"]
            return False
        tags = {"lorafleet.kind": "pipeline", "lorafleet.dataset": self.cfg.dataset}
        self.run_id = start_run(self.uri, self.experiment, f"pipeline {self.name}", tags)
        marker.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri}) + "\n")
        return True

    def _describe_run(self, new: bool) -> None:
        from training.tracking import flatten

        if new:
            self.tracker.log_params(flatten(self.cfg.model_dump(mode="json")))
        if job := os.environ.get("LORAFLEET_SUBMISSION_ID"):
            # a rerun reuses the run: the latest job's id, plus one tag per job so each stays findable
            self.tracker.set_tags({"lorafleet.submission_id": job, JOB_TAG + job: "pipeline"})

    def _check_storage(self, tcfg) -> None:
        import ray

        from cluster.storage import storage_problems
        from training.config import PreflightError

        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        paths = {"output_dir": str(self.run_dir), "tune trial.ray.storage_path": tcfg.trial.ray.storage_path}
        if problems := storage_problems(paths, nodes, self.cfg.storage.shared):
            raise PreflightError("\n  - ".join(["shared storage needed:", *problems]))

    def run(self) -> PipelineResult:
        from training.cluster_state import up_mlflow
        from training.config import PreflightError
        from training.ray_train import init_ray

        self.uri = self.cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or up_mlflow()
        if not self.uri or not self.uri.startswith(("http://", "https://", "databricks")):
            raise PreflightError(
                "the pipeline needs an MLflow tracking server (trials, registry and Serve share it): "
                "`lorafleet up` starts one, or set mlflow.tracking_uri / $MLFLOW_TRACKING_URI"
            )
        tcfg = self.tune_config()
        self.check_configs(tcfg)
        ccfg = self.caption_config(tcfg) if self.cfg.caption.enabled else None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        init_ray()
        self._check_storage(tcfg)
        new = self._open_run()
        previous = signal.signal(signal.SIGTERM, self.sigterm)
        status = "FAILED"
        # the run ends with the block, with the status pipeline.json states; what MLflow missed is stated too
        with driver_tracker(self.uri, self.run_id, local_record=self.run_dir / GAP_RECORD) as self.tracker:
            try:
                self._describe_run(new)
                if ccfg is not None:
                    self._stage("caption", self.caption, ccfg)
                self._stage("validate", self.validate, tcfg)
                tcfg = self.tune_config()  # now with the dataset's trigger, held-out set and sample prompts
                tcfg.trial.mlflow.tracking_uri = self.uri
                tcfg.trial.mlflow.parent_run_id = self.run_id
                stages = [("tune", self.tune, tcfg), ("evaluate", self.evaluate, tcfg), ("gate", self.gate),
                          ("register", self.register)]  # fmt: skip
                if self.cfg.serve.enabled:
                    stages += [("deploy", self.deploy, tcfg), ("smoke", self.smoke)]
                for name, fn, *args in stages[: STAGES.index(self.cfg.until)]:
                    self._stage(name, fn, *args)
                status = "FINISHED"
            except Stopped:
                status = "KILLED"
                raise
            finally:
                signal.signal(signal.SIGTERM, previous)
                self.summary["status"] = status.lower()
                self._save()
                self.tracker.end_status = status
                self.tracker.log_artifact(self.run_dir / SUMMARY)
                if job := os.environ.get("LORAFLEET_SUBMISSION_ID"):
                    self.tracker.log_artifact(self.run_dir / SUMMARY, f"jobs/{job}")  # this job's outcome
                if (self.run_dir / "smoke.png").is_file() and status == "FINISHED":
                    self.tracker.log_artifact(self.run_dir / "smoke.png")
        return PipelineResult(str(self.run_dir), self.summary, self.run_id, self.uri, self.summary["stages"])


def run(cfg: PipelineConfig, *, resume: bool = False) -> PipelineResult:
    return Pipeline(cfg, resume=resume).run()


def main(argv: list[str] | None = None) -> int:
    from training.quiet import quiet_libraries

    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m cluster.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/pipeline.yaml")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search (Tuner.restore)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. serve.port=8001 name=try2")
    args = parser.parse_intermixed_args(argv)

    from evaluation.registry import RegistryError
    from training.adapter import AdapterError
    from training.captions import TriggerError
    from training.config import PreflightError
    from training.configuration import ConfigError, load_config
    from training.data import DatasetError
    from training.names import DatasetNameError

    try:
        cfg = load_config(PipelineConfig, config_file(args.config), args.overrides)
        result = run(cfg, resume=args.resume)
    except (
        ConfigError,
        DatasetError,
        DatasetNameError,
        PreflightError,
        AdapterError,
        RegistryError,
        TriggerError,
    ) as exc:
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
        print(f"{reg['alias']}: {reg['model']}/{reg['version']} (alias {reg['alias']})")
    if smoke:
        print(f"serving: {smoke['url']}  smoke image: {smoke.get('image')} ({smoke['seconds']} s)")
    print(f"pipeline.json: {Path(result.run_dir) / SUMMARY}  mlflow run {result.run_id} ({result.tracking_uri})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
