"""OpenAI's fine-tuning routes over the job store and queue: what ``serving.http``'s ingress methods call.

    client.fine_tuning.jobs.create(training_file=f.id, model="base", suffix="my-style",
                                   hyperparameters={"n_epochs": 4}, extra_body={"trigger": "sks"})
    client.fine_tuning.jobs.retrieve(job.id).status          # validating_files → queued → running → succeeded
    client.images.generate(model=job.fine_tuned_model, prompt="a sks circle")     # served at once, no redeploy

Every route acts for the request's tenant; another tenant's job (or file) is a 404 worded as a missing one. Errors
are OpenAI's body with the status chosen here (``STATUS``).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import secrets
import threading
from functools import wraps
from pathlib import Path
from typing import Any

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from serving.adapters import AdapterResolver, AdapterUnavailable, UnknownModel
from serving.config import ServeArgs, project_path
from serving.finetune import continued
from serving.finetune.jobs import (
    CreateJobBody,
    JobRecord,
    JobRequestError,
    JobStore,
    page,
    pipeline_overrides,
    search_overrides,
)
from serving.finetune.queue import JobQueue
from serving.schemas import Params, error_body
from serving.tenants import NotFound, Tenant, owner_of, registry_name, tenant_of
from serving.uploads.store import FileNotFound, FileStore, InvalidUpload
from training.adapter_meta import AdapterError

log = logging.getLogger(__name__)
STATUS: dict[type[Exception], int] = {NotFound: 404, FileNotFound: 404, JobRequestError: 400, InvalidUpload: 400,
                                      AdapterUnavailable: 503}  # fmt: skip


class PageQuery(Params):
    """OpenAI's list parameters (``after``: the previous page's last id; ``limit``: 1-100, default 20)."""

    after: str | None = Field(None, description="an id: the page starts after it")
    limit: int = Field(20, ge=1, le=100, description="items per page")

    @classmethod
    def _not_given(cls, value: object) -> bool:
        return value == ""


def _answers_errors(route):
    @wraps(route)
    async def answer(*args, **kwargs):
        try:
            return JSONResponse(await route(*args, **kwargs))
        except tuple(STATUS) as exc:
            status = next(code for kind, code in STATUS.items() if isinstance(exc, kind))
            where = {"file": "/v1/files", "model": "/v1/models"}.get(getattr(exc, "kind", None), "/v1/fine_tuning/jobs")
            message = str(exc) + (f"; list yours with GET {where}" if isinstance(exc, NotFound) else "")
            return JSONResponse(error_body(status, message, getattr(exc, "param", None)), status_code=status)

    return answer


class FineTuning:
    """The routes' state in one ingress replica: the store, the queue (its submitter built on first use) and the
    poller thread that calls ``queue.tick()`` every ``finetune.poll_s``."""

    def __init__(self, args: ServeArgs, files: FileStore, submitter: Any = None, resolver: Any = None):
        self.args, self.cfg, self.files = args, args.finetune, files
        self.store = JobStore(files.root / "jobs")
        self._submitter = submitter
        self._resolver = resolver  # serving.adapters.AdapterResolver: what `model` names, built on first use
        self.queue = JobQueue(self.store, _Lazy(self), self.cfg.max_running, self.cfg.per_tenant)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submitter(self) -> Any:
        if self._submitter is None:
            module, cls = self.cfg.submitter.split(":")
            self._submitter = getattr(importlib.import_module(module), cls)(
                address=self.cfg.ray_address, tracking_uri=self.args.resolved_tracking_uri(),
                config=self.cfg.pipeline_config, cpus_per_job=self.cfg.cpus_per_job, gpus_per_job=self.cfg.gpus_per_job,
            )  # fmt: skip
        return self._submitter

    def resolver(self) -> Any:
        if self._resolver is None:
            self._resolver = AdapterResolver(self.args, self.args.base_model, self.files.root / "jobs-adapters")
        return self._resolver

    def start(self) -> None:
        """Start the poller (a daemon thread: the Ray calls block)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="finetune-queue", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            try:
                self.queue.tick()
            except Exception:  # noqa: BLE001 - a failed poll is logged and tried again
                log.exception("fine-tuning queue: poll failed")

    # ---- creating a job ---------------------------------------------------------------------------------------
    def build(self, body: CreateJobBody, tenant: Tenant | str) -> JobRecord:
        """Check the request, hold its datasets (and the adapter it continues) and make the job's record (status
        ``validating_files``).

        Raises:
            JobRequestError: a model, suffix or file this server cannot train on; earlier data that cannot be found
                (400).
            NotFound: no such file of this tenant, or no adapter ``model`` it may use (404).
            AdapterUnavailable: the registry cannot be reached now (503).
        """
        from training.configuration import load_config
        from tuning.config import TuneConfig

        who = tenant if isinstance(tenant, Tenant) else Tenant(tenant)
        tenant = who.name
        source = self._adapter(body.model, who)  # None: the base model
        if body.mix_previous_data and source is None:
            raise JobRequestError("mix_previous_data needs model = an adapter to continue; with 'base' drop it",
                                  "mix_previous_data")  # fmt: skip
        pinned = continued.pinned_shape(source.meta, body.hyperparameters.rank) if source else {}
        earlier = (continued.earlier_job(self.store, tenant, source.registered, source.version)
                   if body.mix_previous_data else None)  # fmt: skip
        job_id = self.store.new_id()
        own = source is not None and bool(source.registered) and owner_of(source.registered) == tenant
        try:
            name = body.suffix or f"ft-{job_id[6:14]}"
            fine_tuned = source.registered if own and not body.suffix else registry_name(tenant, name)
        except ValueError as exc:
            raise JobRequestError(str(exc), "suffix") from exc
        data, captioned = self._dataset(body.training_file, tenant, "training_file")
        if not captioned and not body.trigger:
            raise JobRequestError(
                f"training_file {body.training_file}: its images came without captions, so the job captions them, "
                "and each caption carries the trigger: pass one (extra_body={'trigger': 'sks'}), or upload captions",
                "trigger",
            )
        if earlier and not captioned:
            raise JobRequestError(
                f"training_file {body.training_file}: its images came without captions, and mix_previous_data joins "
                "them to the earlier captioned dataset before any stage runs; upload them with captions "
                "(`lorafleet caption DIR`), or leave mix_previous_data false",
                "mix_previous_data",
            )
        held = None
        if body.validation_file:
            held, held_captioned = self._dataset(body.validation_file, tenant, "validation_file")
            if not held_captioned:
                raise JobRequestError(
                    f"validation_file {body.validation_file}: held-out images need captions (the held-out loss "
                    "and the evaluation prompts are made of them); caption them (`lorafleet caption DIR`) and upload "
                    "again, or leave validation_file out to hold out images of the training file",
                    "validation_file",
                )
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        tune = load_config(TuneConfig, str(project_path(self.cfg.tune_config)), [])
        now = self.store.clock()
        record = JobRecord(
            id=job_id, tenant=tenant, created_at=int(now), order=now, model=body.model,
            base_model=self.args.base_model,
            training_file=body.training_file, validation_file=body.validation_file, seed=seed,
            hyperparameters=body.hyperparameters, suffix=body.suffix, metadata=body.metadata, trigger=body.trigger,
            fine_tuned_model=fine_tuned, overrides=[], previous_data_job=earlier.id if earlier else None,
            continued_from=(f"{source.registered}/{source.version}" if source.registered else source.name)
            if source else None, concept=body.concept, caption=not captioned,
        )  # fmt: skip
        folder = self.store.folder(job_id)
        if source:
            pinned["lora.init_adapter"] = str(folder / continued.INIT_ADAPTER)
        record.overrides = pipeline_overrides(
            record, folder / "data", folder / "heldout" if held else None,
            search_overrides(body.hyperparameters, tune, self.cfg.auto_trials, seed, pinned), self.cfg.tune_config,
        )  # fmt: skip
        record.overrides += self.cfg.overrides
        record.event("created", f"fine-tuning job created for {body.training_file}"
                     + (" (its images have no captions: the job captions them first)" if record.caption else ""),
                     self.store.clock())  # fmt: skip
        self.store.save(record)
        try:
            if source:
                continued.hold_adapter(source.path, self.store, job_id)
            if earlier:
                mixed = continued.mix_datasets(data, self.store.folder(earlier.id) / "data", folder / "data",
                                               dict(self.files.cfg.data))  # fmt: skip
                record.event("mixed", f"{mixed['previous']} earlier images of {earlier.id} mixed with the "
                             f"{mixed['new']} new ones", self.store.clock(), data=mixed)  # fmt: skip
            else:
                self.store.hold_dataset(data, job_id)
            if held:
                self.store.hold_dataset(held, job_id, "heldout")
        except JobRequestError as exc:  # the earlier data no longer validates
            record.status, record.error = "failed", {"code": "invalid_data", "message": str(exc), "param": exc.param}
            self.store.save(record)
            raise
        except OSError as exc:
            record.status, record.error = "failed", {"code": "storage", "message": str(exc), "param": None}
            self.store.save(record)
            raise JobRequestError(f"the job's dataset could not be held ({exc}); retry, or ask the operator to "
                                  "check the space under files.root", "training_file") from exc  # fmt: skip
        return record

    def _adapter(self, model: str, tenant: Tenant) -> Any:
        """None for the base model; else the verified adapter ``model`` names for ``tenant``
        (``serving.adapters.ResolvedAdapter``), resolved as ``/v1/images/generations`` resolves it.

        Raises:
            NotFound: no adapter of that name this tenant may use (another tenant's is worded alike).
            JobRequestError: the adapter fails verification (its files, or another base model).
            AdapterUnavailable: the registry cannot be reached now.
        """
        base = self.args.base_model
        if model in ("base", base, base.rstrip("/").rsplit("/", 1)[-1]):
            return None
        try:
            return self.resolver().resolve(model, tenant)
        except UnknownModel as exc:
            raise NotFound("model", model, "model") from exc
        except AdapterError as exc:
            raise JobRequestError(f"model {model[:80]!r} cannot be continued: {exc}", "model") from exc

    def _dataset(self, file_id: str, tenant: str, param: str) -> tuple[Path, bool]:
        """(the file's dataset folder, whether its images came with captions)."""
        try:
            path = self.files.data_dir(file_id, tenant)
            facts = self.files.get(file_id, tenant).dataset
        except FileNotFound as exc:
            raise NotFound("file", file_id, param) from exc
        except InvalidUpload as exc:
            raise JobRequestError(str(exc), param) from exc
        return path, facts is None or facts.captions


class _Lazy:
    """The queue's submitter, built on first use (the cluster may come up after the Serve app)."""

    def __init__(self, owner: FineTuning):
        self.owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.owner.submitter(), name)


# ---- the routes ---------------------------------------------------------------------------------------------------
@_answers_errors
async def create_job(ft: FineTuning, request: Request, body: CreateJobBody) -> dict:
    """``POST /v1/fine_tuning/jobs``: the job object (status ``queued``; ``cancelled`` if cancelled meanwhile)."""
    record = await asyncio.to_thread(ft.build, body, tenant_of(request))
    return (await asyncio.to_thread(ft.queue.enqueue, record)).to_openai()


@_answers_errors
async def list_jobs(ft: FineTuning, request: Request, query: PageQuery) -> dict:
    """``GET /v1/fine_tuning/jobs``: the tenant's jobs, newest first."""
    tenant = tenant_of(request).name
    records = [r for r in reversed(await asyncio.to_thread(ft.store.all)) if r.tenant == tenant]
    out = page(records, query.after, query.limit, lambda r: r.id, "fine-tuning job")
    return out | {"data": [r.to_openai() for r in out["data"]]}


@_answers_errors
async def retrieve_job(ft: FineTuning, request: Request, job_id: str) -> dict:
    return (await asyncio.to_thread(ft.store.get, job_id, tenant_of(request).name)).to_openai()


@_answers_errors
async def cancel_job(ft: FineTuning, request: Request, job_id: str) -> dict:
    return (await asyncio.to_thread(ft.queue.cancel, job_id, tenant_of(request).name)).to_openai()


@_answers_errors
async def list_events(ft: FineTuning, request: Request, job_id: str, query: PageQuery) -> dict:
    """``GET /v1/fine_tuning/jobs/{id}/events``: newest first, as OpenAI lists them."""
    record = await asyncio.to_thread(ft.store.get, job_id, tenant_of(request).name)
    out = page(list(reversed(record.events)), query.after, query.limit, lambda e: e.id, "event")
    return out | {"data": [e.model_dump() for e in out["data"]]}


@_answers_errors
async def list_checkpoints(ft: FineTuning, request: Request, job_id: str, query: PageQuery) -> dict:
    record = await asyncio.to_thread(ft.store.get, job_id, tenant_of(request).name)
    out = page(record.checkpoints, query.after, query.limit, lambda c: c["id"], "checkpoint")
    data = out["data"]
    return out | {"first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
