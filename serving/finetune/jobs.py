"""Fine-tuning jobs: the request, OpenAI's job/event/checkpoint objects, and the record each job keeps on disk.

    store = JobStore(files_root / "jobs")
    record = store.new(tenant="acme", body=CreateJobBody(model="base", training_file="file-…"), model="models/toy-sd",
                       fine_tuned_model="acme--my-style", data_dir=path)   # holds its own copy of the dataset
    store.get(record.id, "acme").to_openai()                              # {"object": "fine_tuning.job", …}

On disk, one folder per job next to the uploaded files: ``<files.root>/jobs/<job id>/job.json`` (the record,
written atomically: temporary file + ``os.replace``), ``data/`` (the dataset, hard-linked from the upload so a
``DELETE /v1/files`` cannot pull it from under a running job) and ``runs/`` (the pipeline's ``output_dir``, where it
writes ``<job id>/pipeline.json``). The record is all the queue needs to resume after a restart of the Serve app.

What the job runs is ``python -m cluster.pipeline`` with the dotted overrides ``pipeline_overrides`` builds: the
dataset, ``until=register`` (the running Serve app resolves the registered name on demand: no redeploy), the
registered model name (``<tenant>--<suffix>``), ``caption.enabled=true`` when the upload came without captions (the
pipeline's caption stage; its ``caption.captioner`` — auto: toy for a toy base, BLIP otherwise — is set by an
operator through ``finetune.overrides``), the evaluation suite's concept word, and the search: fixed hyperparameters
are one trial (a one-point grid), ``"auto"`` ones are searched (``search.num_samples`` = ``finetune.auto_trials``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from serving.schemas import RequestBody
from serving.tenants import NotFound
from serving.uploads.store import write_json

JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}\Z")
RECORD = "job.json"
Status = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL = ("succeeded", "failed", "cancelled")
Auto = Literal["auto"]
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")


def _word(value: str) -> str:
    """A trigger or concept goes into every caption and prompt: no line breaks, tabs, escape or format characters
    (category C: control, format such as U+202E, unassigned), no spaces at either end, not only spaces."""
    if value != value.strip() or any(unicodedata.category(ch)[0] in "CZ" and ch != " " for ch in value):
        raise ValueError("must be words: no control or format characters and no spaces at either end")
    return value


Word = Annotated[str, AfterValidator(_word)]
MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class JobRequestError(ValueError):
    """A create request this server refuses (HTTP 400); ``param`` names the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Hyperparameters(RequestBody):
    """OpenAI's ``hyperparameters`` plus lorafleet's ``rank`` and ``optimizer``; ``"auto"`` = searched by Tune."""

    n_epochs: Annotated[int, Field(ge=1, le=1000)] | Auto = Field("auto", description="epochs (train.epochs)")
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Auto = Field(
        "auto", description="times the tune config's trial.train.lr (train.lr)"
    )
    batch_size: Annotated[int, Field(ge=1, le=256)] | Auto = Field("auto", description="images per step")
    rank: Annotated[int, Field(ge=1, le=256)] | Auto = Field("auto", description="lorafleet: LoRA rank (lora.rank)")
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "auto"] = Field(
        "auto", description="lorafleet: train.optimizer (adamw8bit needs a CUDA GPU)"
    )


class CreateJobBody(RequestBody):
    """``POST /v1/fine_tuning/jobs`` (OpenAI's fields; lorafleet's ``trigger`` through the client's extra_body).
    ``null`` for an optional field means "not given" (``RequestBody``), as OpenAI's SDKs send it."""

    model: str = Field(
        ...,
        min_length=1,
        max_length=200,
        description="'base' (or the served base model's name), or an adapter you may use — a fine_tuned_model, "
        "<name>@<alias>, <name>/<version>, a shared one — to train it further (serving/finetune/continued.py)",
    )
    training_file: str = Field(..., description="an uploaded file's id (POST /v1/files, purpose fine-tune)")
    validation_file: str | None = Field(None, description="held-out images: another uploaded file's id")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="fixed values or 'auto'")
    suffix: str | None = Field(
        None, min_length=1, max_length=64, description="the registered model's name (prefixed with the tenant)"
    )
    seed: int | None = Field(None, ge=0, lt=2**31, description="trial and search seed; null = a random one")
    metadata: dict[MetadataKey, MetadataValue] | None = Field(
        None, max_length=16, description="up to 16 key-value pairs (keys up to 64 characters, values 512), returned"
    )
    trigger: Word | None = Field(
        None, min_length=1, max_length=64, description="lorafleet: the trigger word; null = from the captions"
    )
    mix_previous_data: bool = Field(
        False, description="lorafleet, with model = an adapter: also train on the dataset of the job that made it"
    )
    concept: Word | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^\S(.*\S)?$",
        description="lorafleet: the concept the trigger stands for in words the evaluation's CLIP knows, e.g. "
        "'dotted' (the suite's concept word, evaluation auto_suite.concept): clip_t and concept_learned are "
        "measured too; null = judged by image similarity only",
    )


class JobEvent(BaseModel):
    """OpenAI's ``fine_tuning.job.event``."""

    id: str = Field(description="'ftevent-' + 24 hex digits, derived from the job id and the event's key")
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int = Field(description="when the queue saw it, Unix seconds")
    level: Literal["info", "warn", "error"] = Field("info", description="error for a failed stage")
    message: str = Field(description="what happened")
    data: dict[str, Any] | None = Field(None, description="the stage's numbers (pipeline.json), if any")
    type: Literal["message", "metrics"] = Field("message", description="metrics: the data holds numbers")


class JobRecord(BaseModel):
    """What ``job.json`` holds: the job object's fields plus what the queue needs."""

    id: str = Field(description="'ftjob-' + 24 hex digits")
    tenant: str = Field(description="the owner; other tenants get 404")
    created_at: int = Field(description="Unix seconds")
    order: float = Field(description="creation time, Unix seconds with fractions: queued jobs start in this order")
    status: Status = Field("validating_files", description="OpenAI's job status")
    model: str = Field(description="as requested: the base model, or the adapter it continues")
    base_model: str = Field(description="the served base model the job trains on (trial.base_model)")
    training_file: str = Field(description="the uploaded file's id")
    validation_file: str | None = Field(None, description="held-out images' file id")
    hyperparameters: Hyperparameters = Field(description="as requested")
    seed: int = Field(description="trial and search seed")
    suffix: str | None = Field(None, description="as requested")
    metadata: dict[str, str] | None = Field(None, description="as requested")
    trigger: str | None = Field(None, description="lorafleet: the trigger word, null = from the captions")
    continued_from: str | None = Field(None, description="the adapter continued: <registered model>/<version>")
    previous_data_job: str | None = Field(None, description="mix_previous_data: the job whose dataset was mixed in")
    concept: str | None = Field(None, description="lorafleet: the evaluation suite's concept word")
    caption: bool = Field(False, description="the training file came without captions: the pipeline captions it")
    progress_offset: int = Field(0, description="bytes of the search's progress.jsonl already turned into events")
    fine_tuned_model: str = Field(description="the registered model name the job registers (shown once it succeeds)")
    overrides: list[str] = Field(description="the pipeline's dotted overrides")
    submission_id: str | None = Field(None, description="the Ray job's id once submitted")
    ray_status: str | None = Field(None, description="the Ray job's last seen status")
    cancel_requested: bool = Field(False, description="cancel asked while it was running: Jobs.stop was sent")
    error: dict[str, Any] | None = Field(None, description="OpenAI's error object {code, message, param}")
    finished_at: int | None = Field(None, description="Unix seconds")
    stages: dict[str, str] = Field(default_factory=dict, description="pipeline stage -> last status seen")
    checkpoints: list[dict[str, Any]] = Field(default_factory=list, description="fine_tuning.job.checkpoint objects")
    events: list[JobEvent] = Field(default_factory=list, description="oldest first")

    def event(self, key: str, message: str, now: float, *, level: str = "info", data: dict | None = None) -> None:
        """Append an event with a stable id (one per ``key``: the same key twice is recorded once)."""
        digest = hashlib.sha256(f"{self.id}/{key}".encode()).hexdigest()[:24]
        if any(e.id == f"ftevent-{digest}" for e in self.events):
            return
        kind = "metrics" if data and any(isinstance(v, (int, float)) for v in data.values()) else "message"
        self.events.append(JobEvent(id=f"ftevent-{digest}", created_at=int(now), level=level, message=message,
                                    data=data, type=kind))  # fmt: skip

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's ``fine_tuning.job`` object (``fine_tuned_model`` only once it succeeded)."""
        hp = self.hyperparameters.model_dump()
        return {
            "id": self.id, "object": "fine_tuning.job", "created_at": self.created_at, "error": self.error,
            "fine_tuned_model": self.fine_tuned_model if self.status == "succeeded" else None,
            "finished_at": self.finished_at, "hyperparameters": {k: hp[k] for k in ("batch_size",
            "learning_rate_multiplier", "n_epochs")}, "model": self.model, "organization_id": self.tenant,
            "result_files": [], "seed": self.seed, "status": self.status, "trained_tokens": None,
            "training_file": self.training_file, "validation_file": self.validation_file, "estimated_finish": None,
            "integrations": [], "metadata": self.metadata, "method": {"type": "supervised", "supervised": {
                "hyperparameters": hp}}, "user_provided_suffix": self.suffix, "trigger": self.trigger,
            "continued_from": self.continued_from, "mix_previous_data": self.previous_data_job is not None,
            "concept": self.concept,
        }  # fmt: skip


class JobStore:
    """Job records under one folder (``<files.root>/jobs``); ``clock`` gives Unix seconds (tests pass a fake)."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time):
        self.root, self.clock = Path(root), clock

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def new_id(self) -> str:
        return f"ftjob-{secrets.token_hex(12)}"

    def hold_dataset(self, source: Path, job_id: str, name: str = "data") -> Path:
        """The job's own copy of an uploaded dataset: hard links where the file system allows (no bytes copied;
        the upload's DELETE then removes only its names), else copies."""
        target = self.folder(job_id) / name
        try:
            shutil.copytree(source, target, copy_function=os.link, symlinks=False)
        except OSError:
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, symlinks=False)
        return target

    def save(self, record: JobRecord) -> None:
        self.folder(record.id).mkdir(parents=True, exist_ok=True)
        write_json(self.folder(record.id) / RECORD, record.model_dump(mode="json"))

    def load(self, job_id: str) -> JobRecord | None:
        if not JOB_ID.match(job_id or ""):
            return None
        try:
            return JobRecord.model_validate(json.loads((self.folder(job_id) / RECORD).read_text()))
        except (OSError, ValueError):
            return None

    def get(self, job_id: str, tenant: str) -> JobRecord:
        """The tenant's job. Raises NotFound (404) for a missing one and for another tenant's, worded alike."""
        record = self.load(job_id)
        if record is None or record.tenant != tenant:
            raise NotFound("fine-tuning job", job_id, "fine_tuning_job_id")
        return record

    def all(self) -> list[JobRecord]:
        """Every job, oldest first (by creation time, then id): the order queued jobs start in."""
        found = [r for p in (self.root.iterdir() if self.root.is_dir() else ()) if (r := self.load(p.name))]
        return sorted(found, key=lambda r: (r.order, r.id))


def page(items: list[Any], after: str | None, limit: int, ident: Callable[[Any], str], kind: str) -> dict[str, Any]:
    """OpenAI's list page: the items after the one whose id is ``after``, at most ``limit``, with ``has_more``.

    Raises:
        NotFound: ``after`` names no item of the list.
    """
    if after is not None:
        ids = [ident(i) for i in items]
        if after not in ids:
            raise NotFound(kind, after, "after")
        items = items[ids.index(after) + 1 :]
    shown = items[:limit]
    return {"object": "list", "data": shown, "has_more": len(items) > len(shown)}


def search_overrides(hp: Hyperparameters, tune: Any, auto_trials: int, seed: int,
                     pinned: dict[str, Any] | None = None) -> list[str]:  # fmt: skip
    """The tune stage's dotted overrides for ``hp`` over the tune config ``tune`` (a ``tuning.config.TuneConfig``).

    Fixed values are set on the trial (``trial.train.epochs`` …); the ``"auto"`` ones stay in the search space
    (conditions on a fixed key are resolved: a key whose ``when`` the fixed value fails is dropped). With nothing
    left to search the job is one trial (a one-point grid); else ``search.num_samples = auto_trials``. ``pinned``
    (a continued adapter's ``lora.*`` shape and ``lora.init_adapter``) is set on the trial and leaves the space
    like a fixed value, but is never a grid key (tuning refuses to search the shape of a continued adapter).
    """
    pinned = pinned or {}
    fixed: dict[str, Any] = {}
    if hp.n_epochs != "auto":
        fixed["train.epochs"] = hp.n_epochs
    if hp.learning_rate_multiplier != "auto":
        fixed["train.lr"] = hp.learning_rate_multiplier * tune.trial.train.lr
    if hp.rank != "auto":
        fixed["lora.rank"] = hp.rank
    if hp.optimizer != "auto":
        fixed["train.optimizer"] = hp.optimizer
    fixed = {k: v for k, v in fixed.items() if k not in pinned}
    known = fixed | pinned
    out = [f"trial.{k}={json.dumps(v)}" for k, v in known.items()]
    if hp.batch_size != "auto":
        out.append(f"trial.train.batch_size={hp.batch_size}")
    out += [f"trial.train.seed={seed}", f"search.seed={seed}"]
    space = {}
    for key, spec in tune.model_dump(mode="json")["space"].items():
        when = spec.get("when") or {}
        if key in known or any(c in known and known[c] not in allowed for c, allowed in when.items()):
            continue
        spec["when"] = {c: v for c, v in when.items() if c not in known} or None
        space[key] = spec
    if not space:
        grid = {k: [v] for k, v in fixed.items()} or {"train.epochs": [tune.trial.train.epochs]}
        return out + ["search.algorithm=grid", f"grid={json.dumps(grid)}", "search.num_samples=1"]
    points = [{k: v for k, v in p.items() if k in space} for p in tune.search.points_to_evaluate]
    points = [p for p in points if p and all(k in p for k, s in space.items() if not s["when"])]
    algorithm = tune.search.algorithm if tune.search.algorithm != "grid" else "optuna"
    return out + [f"search.algorithm={algorithm}", f"space={json.dumps(space)}",
                  f"search.points_to_evaluate={json.dumps(points[:1])}",
                  f"search.num_samples={auto_trials}"]  # fmt: skip


def pipeline_overrides(record: JobRecord, data: Path, heldout: Path | None, tune_overrides: list[str],
                       tune_config: str) -> list[str]:  # fmt: skip
    """The pipeline's dotted overrides (cluster/config.py's PipelineConfig) for one job."""
    evaluation = [f"registry.model_name={record.fine_tuned_model}"]
    if record.concept:  # quoted: a YAML scalar such as `yes` or `1` stays the word
        evaluation.append(f"auto_suite.concept={json.dumps(record.concept)}")
    out = [f"name={record.id}", f"output_dir={data.parent / 'runs'}", f"dataset={data}", "until=register",
           "serve.enabled=false", f"tune.config={tune_config}",
           f"tune.overrides={json.dumps([f'trial.base_model={record.base_model}', *tune_overrides])}",
           f"evaluation.overrides={json.dumps(evaluation)}"]  # fmt: skip
    if record.caption:
        out.append("caption.enabled=true")
    if heldout is not None:
        out.append(f"heldout={heldout}")
    if record.trigger:
        out.append(f"trigger={json.dumps(record.trigger)}")  # quoted, as the concept: `yes` or `null` stays the word
    return out
