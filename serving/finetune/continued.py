"""Continuing an existing adapter through the jobs API: ``model`` = an adapter the tenant may use.

    client.fine_tuning.jobs.create(model="acme--my-style", training_file=new.id,
                                   extra_body={"mix_previous_data": True})   # a new version of acme--my-style

The name resolves as ``/v1/images/generations`` resolves it (``serving.adapters.AdapterResolver``: the tenant's own
``<tenant>--<name>`` (its champion, ``@alias`` or ``/version``), a configured or operator's adapter, one marked
shared; another tenant's is a 404 worded as a missing one) to a verified folder, which the job holds a copy of and
trains from (``trial.lora.init_adapter``, ``training/init_adapter.py``). The adapter fixes the LoRA's shape: rank,
alpha, target modules and text-encoder LoRA are pinned on the trial and taken out of an ``"auto"`` search (a rank
asked for that differs is a 400 naming ``hyperparameters.rank``).

``mix_previous_data`` (lorafleet's field, sent through ``extra_body`` like ``trigger``; named like OpenAI's request
fields — snake case, a verb phrase for a flag, as ``parallel_tool_calls`` or ``store`` — and says what it does: the
earlier images are mixed in, not weighted or replayed): the dataset of the job that produced exactly this adapter
version (its held copy, ``<files.root>/jobs/<id>/data``, which already holds that job's own earlier data if it
mixed too) joins the new images in one ``metadata.jsonl`` (hard links, no bytes copied). Only the tenant's own
jobs' data is mixed; an adapter no job of this tenant produced (a shared one, a configured folder, one registered
outside this API) has no earlier data here: a 400 that says so.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from serving.finetune.jobs import JobRecord, JobRequestError, JobStore
from training.config import DataConfig
from training.data import validate_dataset
from training.init_adapter import InitAdapterError, adapter_shape

INIT_ADAPTER = "init_adapter"  # the job's copy of the adapter it continues, next to data/


def pinned_shape(meta: Any, requested_rank: int | str) -> dict[str, Any]:
    """The trial's ``lora.*`` values that continue the adapter ``meta`` (``training.adapter.AdapterMeta``).

    Raises:
        JobRequestError: the adapter records no single rank / targets (param ``model``), or ``requested_rank`` is
            a number other than its rank (param ``hyperparameters``).
    """
    try:
        shape = adapter_shape(meta)
    except InitAdapterError as exc:
        raise JobRequestError(str(exc).replace("lora.init_adapter", "model"), "model") from exc
    if requested_rank not in ("auto", shape["lora.rank"]):
        raise JobRequestError(
            f"hyperparameters.rank={requested_rank} but the adapter in model has rank {shape['lora.rank']}: a "
            f"continued adapter keeps its rank; leave rank 'auto' (it is pinned to {shape['lora.rank']}) or set it",
            "hyperparameters",
        )
    return shape


def hold_adapter(source: Path, store: JobStore, job_id: str) -> Path:
    """The job's own copy of the adapter folder (the resolver's cache may replace its copy meanwhile)."""
    target = store.folder(job_id) / INIT_ADAPTER
    shutil.copytree(source, target, symlinks=False)
    return target


def earlier_job(store: JobStore, tenant: str, registered: str | None, version: str | None) -> JobRecord:
    """The tenant's succeeded job that registered ``registered`` version ``version``, whose dataset copy is there.

    Raises:
        JobRequestError: none (param ``mix_previous_data``), saying why and what to do instead.
    """
    ref = f"{registered}/{version}" if registered and version else None
    for record in reversed(store.all()):  # newest first
        if record.tenant != tenant or record.status != "succeeded" or ref is None:
            continue
        if any(c.get("fine_tuned_model_checkpoint") == ref for c in record.checkpoints):
            if (store.folder(record.id) / "data").is_dir():
                return record
            break
    raise JobRequestError(
        f"mix_previous_data: the earlier data of model {ref or 'this adapter'} cannot be found — no fine-tuning job "
        "of yours on this server produced that version with its dataset still held (shared adapters, configured "
        "ones and those registered outside this API have none here); upload the earlier images together with the "
        "new ones, or leave mix_previous_data false",
        "mix_previous_data",
    )


def mix_datasets(new: Path, earlier: Path, target: Path, data_overrides: dict[str, Any]) -> dict[str, int]:
    """One dataset at ``target``: the images of ``new`` under ``new/``, those of ``earlier`` under ``previous/``
    (hard links where the file system allows, else copies), every caption in ``target/metadata.jsonl``.

    Both folders are read with the validator every training run uses (``training.data.validate_dataset``; any
    layout it reads), with ``data_overrides`` (the upload settings' ``files.data``). Returns the image counts.

    Raises:
        JobRequestError: a folder that no longer validates (param ``mix_previous_data``).
        OSError: the files could not be written.
    """
    rows: list[dict[str, str]] = []
    counts: dict[str, int] = {}
    for prefix, root in (("new", new), ("previous", earlier)):
        report = validate_dataset(DataConfig.model_validate({**data_overrides, "path": str(root)}))
        if errors := report.errors:
            raise JobRequestError(
                f"mix_previous_data: the {prefix} dataset does not validate ({errors[0].message}); create the job "
                "without mix_previous_data",
                "mix_previous_data",
            )
        for example in report.examples:
            rel = Path(prefix) / Path(example.path).resolve().relative_to(Path(report.root).resolve())
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(example.path, target / rel)
            except OSError:
                shutil.copy2(example.path, target / rel)
            rows.append({"file_name": rel.as_posix(), "text": example.caption})  # kohya repeats are not carried
        counts[prefix] = len(report.examples)
    (target / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return counts
