"""Adapters in the MLflow model registry: fetch by reference, register, promote, roll back.

    python -m evaluation.registry show toy-sks-lora
    python -m evaluation.registry rollback toy-sks-lora          # champion goes back to the previous one
    python -m evaluation.registry promote toy-sks-lora 3         # make version 3 the champion by hand
    python -m evaluation.registry promote toy-sks-lora 4 --challenger   # version 4 gets the canary's share

An adapter reference is a local folder, ``runs:/<run id>/<path>`` or ``models:/<name>@<alias>`` /
``models:/<name>/<version>``. Registered versions carry ``adapter_sha256`` and ``base_model`` tags;
``fetch_adapter`` refuses a download whose weights or base model do not match them.
The tracking URI comes from ``--tracking-uri`` or ``$MLFLOW_TRACKING_URI``; the registry lives there too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.adapter_meta import AdapterError, AdapterMeta, base_model_id, verify_adapter

TAG_SHA = "adapter_sha256"
TAG_BASE = "base_model"
TAG_STATUS = "validation_status"  # passed | rejected | rolled_back
TAG_KEY = "eval.comparable_key"  # evaluations with the same key compare directly
TAG_SOURCE = "source"  # imported: a LoRA trained elsewhere (lorafleet import-adapter); trained versions carry none
TAG_METRIC = "metric."  # metric.<name> = value measured by the evaluation that registered the version
TAG_CANARY_STOPPED = "lorafleet.canary_stopped"  # on a version: why a Serve replica stopped its canary, and when
CHALLENGER = "challenger"  # the alias a canary serves next to the champion (serving/canary.py)
HISTORY_TAG = "lorafleet.champion_history"  # registered-model tag: JSON list of versions that were champion
MODEL_TAG = "lorafleet.adapter_model"  # registered-model tag "true": a model whose versions are lorafleet adapters
# MLflow's answers for a name that is not there (RESOURCE_DOES_NOT_EXIST: no model / version; INVALID_PARAMETER_VALUE:
# "Registered model alias previous not found."); every other failure means the registry could not answer
MISSING_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class RegistryError(ValueError):
    """The registry could not answer (unreachable, failed download, no tracking URI), or a reference is malformed."""


class NotInRegistry(RegistryError):
    """The registry answered: no such registered model, alias or version (retrying will not help)."""


@dataclass
class FetchedAdapter:
    path: Path  # a verified local adapter folder
    meta: AdapterMeta
    ref: str  # what was asked for
    run_id: str | None = None  # the run the artifacts came from
    name: str | None = None  # registered model name and version, for models:/ references
    version: str | None = None
    tags: dict[str, str] | None = None


def client_for(uri: str):
    """One client for tracking and registry (the registry lives on the same server or SQLite file)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3").

    Raises:
        RegistryError: not of either form.
    """
    body = ref.removeprefix("models:/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise RegistryError(f"{ref!r}: write a registry reference as models:/<name>@<alias> or models:/<name>/<version>")


def resolve_version(client, ref: str):
    """The ``ModelVersion`` a ``models:/`` reference names.

    Raises:
        NotInRegistry: the registry answered that there is no such model, alias or version.
        RegistryError: the reference is malformed, or the registry could not be reached.
    """
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_ref(ref)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        first = (exc.message or str(exc)).splitlines()[0]
        if exc.error_code in MISSING_CODES:
            what = f"alias {alias!r}" if alias else f"version {version}"
            raise NotInRegistry(f"{ref}: registered model {name!r} has no {what} ({first})") from exc
        raise RegistryError(f"{ref}: the registry did not answer ({first[:300]})") from exc


def _download(client, source: str, dst: Path, uri: str) -> Path:
    if source.startswith("runs:/"):
        rid, _, path = source.removeprefix("runs:/").partition("/")
        return Path(client.download_artifacts(rid, path, str(dst)))
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri))


def fetch_adapter(
    ref: str, dst_root: str | Path, tracking_uri: str | None = None, expected_base: str | None = None
) -> FetchedAdapter:
    """A verified local copy of the adapter ``ref`` names (a folder is used in place).

    Verification: safetensors only, the weights' sha256 matches the adapter's JSON, and for registry
    versions also the ``adapter_sha256`` and ``base_model`` tags; ``expected_base`` (the base model about
    to load it) must be the adapter's base model.

    Raises:
        AdapterError: any verification failed (nothing is loaded).
        RegistryError: the reference names nothing, or needs a tracking URI that is not set.
    """
    version = None
    if not ref.startswith(("runs:/", "models:/")):
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise AdapterError(f"adapter {ref!r} is not a folder, runs:/… or models:/… reference")
        fetched = FetchedAdapter(path, verify_adapter(path), ref)
    else:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise RegistryError(f"{ref} needs an MLflow tracking URI: set MLFLOW_TRACKING_URI or mlflow.tracking_uri")
        client = client_for(uri)
        if ref.startswith("models:/"):
            version = resolve_version(client, ref)
            source, run_id = version.source, version.run_id
        else:
            source, run_id = ref, ref.removeprefix("runs:/").partition("/")[0]
        fetched = _fetch_remote(client, ref, version, source, run_id, Path(dst_root).expanduser(), uri)
    if expected_base is not None and base_model_id(fetched.meta.base_model) != base_model_id(expected_base):
        raise AdapterError(
            f"adapter {ref} was trained on base model {base_model_id(fetched.meta.base_model)!r}, not "
            f"{base_model_id(expected_base)!r}; load it with its own base model (or retrain it on this one)"
        )
    return fetched


def _fetch_remote(client, ref: str, version, source: str, run_id: str, dst: Path, uri: str) -> FetchedAdapter:
    """Download into ``dst/<name>-v<version>`` (or ``dst/run-<id>-<path>``), replacing an earlier copy;
    a download that fails verification is deleted, so nothing refused stays on disk to be loaded later."""
    key = f"{version.name}-v{version.version}" if version is not None else f"run-{ref.removeprefix('runs:/')}"
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
    dst = dst.resolve()  # MLflow hands back absolute paths
    dst.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=dst))
    try:
        try:
            path = _download(client, source, tmp, uri)
        except Exception as exc:
            raise RegistryError(f"cannot download {ref} ({source}): {exc}") from exc
        fetched = FetchedAdapter(path, verify_adapter(path), ref, run_id)
        if version is not None:
            fetched.name, fetched.version, fetched.tags = version.name, str(version.version), dict(version.tags)
            _check_tags(fetched)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = dst / key
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fetched.path = final / path.relative_to(tmp)
    return fetched


def _check_tags(f: FetchedAdapter) -> None:
    tags = f.tags or {}
    where = f"{f.name} version {f.version}"
    if TAG_SHA not in tags:
        raise AdapterError(f"{where} has no {TAG_SHA} tag: register adapters with `python -m evaluation.evaluate`")
    if tags[TAG_SHA] != f.meta.sha256:
        raise AdapterError(
            f"{where}: the downloaded weights' sha256 {f.meta.sha256[:12]}… differs from the registered "
            f"{TAG_SHA} {tags[TAG_SHA][:12]}…; the artifacts were changed after registration — refusing to load"
        )
    if TAG_BASE in tags and tags[TAG_BASE] != base_model_id(f.meta.base_model):
        raise AdapterError(
            f"{where}: registered for base model {tags[TAG_BASE]!r} but the adapter names "
            f"{base_model_id(f.meta.base_model)!r}; refusing to load"
        )


def current(client, name: str, alias: str):
    """The version ``alias`` points at, or None (no model, or no such alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register(
    client, name: str, source: str, run_id: str, tags: dict[str, str], description: str = ""
) -> Any:  # ModelVersion
    """A new version of ``name`` (created if missing) from ``source`` (``runs:/<run>/adapter``).

    The registered model is tagged ``lorafleet.adapter_model=true`` (also when it existed untagged), so a Serve
    app lists it among lorafleet's models and never mistakes another MLflow model for an adapter model.
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, tags={MODEL_TAG: "true"}, description="LoRA adapters registered by lorafleet's evaluation gate"
        )
    else:
        if model.tags.get(MODEL_TAG) != "true":
            client.set_registered_model_tag(name, MODEL_TAG, "true")
    return client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)


def register_folder(
    client, name: str, folder: Path, tags: dict[str, str], experiment: str, description: str = ""
) -> Any:  # ModelVersion
    """Log ``folder`` as a run's ``adapter`` artifacts in ``experiment`` (created if missing) and register it as a new
    version of ``name`` with ``tags`` plus the ``adapter_sha256``/``base_model`` tags ``fetch_adapter`` checks.

    Raises:
        AdapterError: ``folder`` fails verification (nothing is logged).
    """
    meta = verify_adapter(folder)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=f"{name} {meta.sha256[:12]}", tags={"lorafleet.adapter": name})
    client.log_artifacts(run.info.run_id, str(folder), "adapter")
    client.set_terminated(run.info.run_id)
    tags = {TAG_SHA: meta.sha256, TAG_BASE: base_model_id(meta.base_model), **tags}
    return register(client, name, f"runs:/{run.info.run_id}/adapter", run.info.run_id, tags, description)


def adapter_models(client) -> list:  # list[RegisteredModel]
    """Every registered model tagged ``lorafleet.adapter_model=true``, with its tags and aliases, by name.

    Raises:
        mlflow.exceptions.MlflowException: the registry could not be searched.
    """
    found, token = [], None
    while True:
        page = client.search_registered_models(
            filter_string=f"tags.`{MODEL_TAG}` = 'true'", max_results=1000, page_token=token
        )
        found += list(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda m: m.name)


def _history(client, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    try:
        return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]
    except json.JSONDecodeError:
        return []


def promote(client, name: str, version: str, alias: str = "champion", previous_alias: str = "previous") -> str | None:
    """Point ``alias`` at ``version``; the replaced champion gets ``previous_alias``. Returns the replaced version."""
    found = current(client, name, alias)
    old = None if found is None else str(found.version)  # a str over REST, an int from a SQLite store
    if old == str(version):
        return None
    client.set_registered_model_alias(name, alias, str(version))
    if old is not None:
        client.set_registered_model_alias(name, previous_alias, old)
    history = _history(client, name)
    if old is not None and (not history or history[-1] != old):
        history.append(old)  # a champion set outside lorafleet
    history.append(str(version))
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-50:]))
    client.set_registered_model_tag(name, MODEL_TAG, "true")  # a model registered before the tag existed
    return old


def set_challenger(client, name: str, version: str, alias: str = CHALLENGER, champion: str = "champion") -> str | None:
    """Point the challenger ``alias`` at ``version``, clearing its ``lorafleet.canary_stopped`` tag (a new try starts
    clean); the champion and ``previous`` stay. Returns the version the alias held before, or None.

    Raises:
        RegistryError: ``version`` is the champion, or holds the champion's very weights (its ``adapter_sha256``):
            a canary against itself measures nothing.
    """
    held = current(client, name, champion)
    if held is not None and str(held.version) == str(version):
        raise RegistryError(f"{name} version {version} is the {champion} already; a challenger must be another version")
    sha = (client.get_model_version(name, str(version)).tags or {}).get(TAG_SHA)
    if held is not None and sha and sha == (held.tags or {}).get(TAG_SHA):
        raise RegistryError(
            f"{name} version {version} holds the same weights as the {champion} (version {held.version}, "
            f"{TAG_SHA} {sha[:12]}…); a challenger must be a different adapter"
        )
    found = current(client, name, alias)
    old = None if found is None else str(found.version)
    client.set_registered_model_alias(name, alias, str(version))
    if TAG_CANARY_STOPPED in (client.get_model_version(name, str(version)).tags or {}):
        client.delete_model_version_tag(name, str(version), TAG_CANARY_STOPPED)
    client.set_registered_model_tag(name, MODEL_TAG, "true")
    return old


def promote_challenger(
    client, name: str, alias: str = CHALLENGER, champion: str = "champion", previous_alias: str = "previous"
) -> tuple[str | None, str]:
    """Make the challenger the champion (``promote``: the old champion becomes ``previous_alias``, so ``rollback``
    undoes it) and remove the challenger ``alias``. Returns (old champion or None, new champion).

    Raises:
        RegistryError: no challenger alias.
    """
    found = current(client, name, alias)
    if found is None:
        raise RegistryError(f"registered model {name!r} has no {alias!r} alias; set one: lorafleet promote {name} "
                            "VERSION --challenger")  # fmt: skip
    version = str(found.version)
    old = promote(client, name, version, champion, previous_alias)
    client.delete_registered_model_alias(name, alias)
    return old, version


def unservable(version) -> str | None:
    """Why a version asked for by its number alone must not be served, or None.

    A version the gate rejected, or one rolled back from champion, is refused while no alias holds it; an alias
    is a deliberate choice (``lorafleet promote NAME VERSION [--force]``) and serves whatever it points at.
    Versions without a ``validation_status`` tag (registered by hand) are served.
    """
    status = version.tags.get(TAG_STATUS)
    if getattr(version, "aliases", None) or status not in ("rejected", "rolled_back"):
        return None
    name, number = version.name, version.version
    if status == "rejected":
        return (
            f"{name} version {number} was rejected by the evaluation gate (its eval run's report says why) and is not "
            f"served; to serve it anyway, promote it: lorafleet promote {name} {number} --force"
        )
    return (
        f"{name} version {number} was rolled back from champion and is not served; to serve it again, promote it: "
        f"lorafleet promote {name} {number}"
    )


def rollback(client, name: str, alias: str = "champion", previous_alias: str = "previous") -> tuple[str, str]:
    """Move ``alias`` back to the champion before it; returns (from version, to version).

    The demoted version is tagged ``validation_status=rolled_back``; ``previous_alias`` moves one step
    further back (or is removed when there is no earlier champion).

    Raises:
        RegistryError: no champion, or nothing to roll back to.
    """
    found = current(client, name, alias)
    if found is None:
        raise RegistryError(f"registered model {name!r} has no {alias!r} alias; nothing to roll back")
    now = str(found.version)
    history = _history(client, name)
    if history and history[-1] == now and len(history) >= 2:
        target, history = history[-2], history[:-1]
    else:
        prev = current(client, name, previous_alias)
        if prev is None:
            raise RegistryError(f"{name}: no earlier {alias} to roll back to (no {previous_alias!r} alias)")
        target, history = str(prev.version), [str(prev.version)]
    client.set_registered_model_alias(name, alias, target)
    client.set_model_version_tag(name, now, TAG_STATUS, "rolled_back")
    earlier = [v for v in history[:-1] if v != now]
    if earlier:
        client.set_registered_model_alias(name, previous_alias, earlier[-1])
    else:
        client.delete_registered_model_alias(name, previous_alias)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    return now, target


def stored_metrics(version) -> dict[str, float]:
    """The metrics the registering evaluation measured (``metric.<name>`` tags)."""
    return {k.removeprefix(TAG_METRIC): float(v) for k, v in version.tags.items() if k.startswith(TAG_METRIC)}


def describe(client, name: str) -> list[dict[str, Any]]:
    """Every version of ``name``: aliases, validation status, sha256, primary metric tags."""
    versions = client.search_model_versions(f"name='{name}'")
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():  # search results carry none
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in sorted(versions, key=lambda v: int(v.version)):
        rows.append(
            {
                "version": str(v.version),
                "aliases": sorted(aliases.get(str(v.version), [])),
                TAG_STATUS: v.tags.get(TAG_STATUS, ""),
                TAG_SHA: v.tags.get(TAG_SHA, "")[:12],
                TAG_BASE: v.tags.get(TAG_BASE, ""),
                "run_id": v.run_id,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.registry", description=__doc__.split("\n")[0])
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("show", help="list a registered model's versions and aliases")
    s.add_argument("name")
    r = sub.add_parser("rollback", help="move the champion alias back to the previous champion")
    r.add_argument("name")
    r.add_argument("--alias", default="champion")
    r.add_argument("--previous-alias", default="previous")
    pr = sub.add_parser(
        "promote",
        help="make a version the champion (the old one becomes previous)",
        epilog="A checkpoint picked from a trial's sample grids instead: lorafleet promote NAME --trial ID --epoch N "
        "(evaluated, registered, then promoted; see evaluation/promote.py)",
    )
    pr.add_argument("name")
    pr.add_argument("version")
    pr.add_argument("--alias", default="champion")
    pr.add_argument("--previous-alias", default="previous")
    pr.add_argument("--force", action="store_true", help="promote even a version the gate rejected")
    pr.add_argument(
        "--challenger",
        action="store_true",
        help="set the challenger alias instead: the version gets the Serve app's canary.share of the champion's "
        "requests until `lorafleet canary promote` (serving/canary.py)",
    )
    args = p.parse_args(argv)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        print("error: set MLFLOW_TRACKING_URI or pass --tracking-uri (where the registry lives)", file=sys.stderr)
        return 2
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    try:
        if args.command == "show":
            for row in describe(client, args.name):
                print(json.dumps(row))
        elif args.command == "rollback":
            old, new = rollback(client, args.name, args.alias, args.previous_alias)
            print(f"{args.name}: {args.alias} moved from version {old} back to version {new}")
        else:
            status = client.get_model_version(args.name, args.version).tags.get(TAG_STATUS)
            if status == "rejected" and not args.force:
                raise RegistryError(
                    f"{args.name} version {args.version} was rejected by the gate (see its eval run's report); "
                    "pass --force to promote it anyway"
                )
            if args.challenger:
                alias = CHALLENGER if args.alias == "champion" else args.alias
                old = set_challenger(client, args.name, args.version, alias, "champion")
            else:
                alias = args.alias
                old = promote(client, args.name, args.version, args.alias, args.previous_alias)
            if status == "rolled_back":  # promoted again by hand: no longer the rolled-back one
                client.set_model_version_tag(args.name, args.version, TAG_STATUS, "passed")
            print(f"{args.name}: {alias} -> version {args.version}" + (f" (was {old})" if old else ""))
    except (RegistryError, MlflowException) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
