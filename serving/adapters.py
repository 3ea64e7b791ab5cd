"""Which adapter a model name means (the adapters a pipeline holds: ``serving.loaded``).

``AdapterResolver`` turns the name a client sends (``champion``, a configured name, a registered model's name
``toy-ohwx-lora`` = its ``champion.alias``, ``toy-sks-lora@previous``, ``toy-sks-lora/3``) into a verified local
folder: configured folders, ``runs:/`` and ``models:/`` references go through ``evaluation.registry.fetch_adapter``
(safetensors only, sha256 checked against the adapter's JSON and the registry's tag, base model checked). Clients
never name paths. A tenant (``serving.tenants``) resolves only names it may see: configured ones, registry models
without a tenant prefix, its own ``<tenant>--…`` and those marked shared; another tenant's is ``UnknownModel`` worded
the same whether it exists or not. A name the registry does not hold, and a version asked for by number that the
gate rejected or that was rolled back (and no alias holds), is ``UnknownModel`` (404) at once; a registry that cannot
be reached is ``AdapterUnavailable`` (503, retryable) unless an earlier answer is still at hand.

A registry that is down never stalls serving (issue 22): registry calls run on the replica's registry threads
(``serving.registry_watch``), never on a request's; a name resolved once is answered from the cache and looked up
again in the background (stale-while-revalidate); a registry name never resolved waits at most
``registry_deadline_s`` for its first look-up, and gets 503 + ``Retry-After: registry_retry_s`` at once while the
registry is known to be down.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, replace
from pathlib import Path

from evaluation.registry import (
    TAG_SHA,
    NotInRegistry,
    client_for,
    fetch_adapter,
    parse_model_ref,
    resolve_version,
    unservable,
)
from serving.catalog import RegistryCatalog
from serving.config import BASE, MODEL_NAME, ServeArgs, is_folder_ref, project_path
from serving.registry_watch import RegistryWatch, refused_credentials
from serving.tenants import Tenant, owner_of
from training.adapter_meta import AdapterError, AdapterMeta

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    """The name is not served here (HTTP 404)."""


class AdapterUnavailable(RuntimeError):
    """The name is served here but its adapter cannot be fetched right now, e.g. the registry is down (HTTP 503);
    ``retry_after_s``: when to ask again (the ``Retry-After`` header), None for the deployment's default."""

    def __init__(self, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str  # what the client asked for
    ref: str  # folder, runs:/… or models:/…
    path: Path  # verified local folder
    meta: AdapterMeta
    version: str | None = None  # registry version, for models:/ references
    registered: str | None = None  # registered model, for models:/ references

    @property
    def key(self) -> str:
        """Identity of the weights: the same file under two names shares one slot."""
        return self.meta.sha256


@dataclass(frozen=True)
class _Hit:
    adapter: ResolvedAdapter
    expires: float  # time.monotonic() after which a moving reference is looked up again (in the background)
    at: float  # time.time() of the look-up that last confirmed it


@dataclass
class _Fetch:
    future: Future
    started: float  # time.monotonic()
    done: float | None = None  # time.monotonic() when it ended


class AdapterResolver:
    """Model name -> verified local adapter folder, cached. Registry names are stale-while-revalidate: once resolved,
    a name is answered from the cache at once, and looked up again on a registry thread after ``ttl_s``
    (``serving.registry_watch``); a request never waits for the registry longer than ``registry_deadline_s``, and
    not at all while the registry is known to be down."""

    def __init__(self, args: ServeArgs, base_model: str, cache_dir: Path, ttl_s: float | None = None):
        self.args = args
        self.base_model = base_model
        self.cache_dir = cache_dir
        self.ttl_s = args.champion.poll_s if ttl_s is None else ttl_s
        self._cache: dict[str, _Hit] = {}
        self._fetches: dict[str, _Fetch] = {}  # name -> its registry fetch in progress (or just answered)
        self._lock = threading.Lock()  # guards _cache and _fetches; never held during a registry call
        self._download = threading.Lock()  # one fetch at a time (two names may download one version into one folder)
        self.watch = RegistryWatch(args.resolved_tracking_uri(), args.registry_deadline_s, args.registry_retry_s)
        self.catalog = RegistryCatalog(args, self.watch)  # what /v1/models lists from the registry

    def configured(self) -> dict[str, str]:
        """Names served without asking: configured adapters, the champion (and the challenger, with a canary)."""
        refs = dict(self.args.adapters)
        ch = self.args.champion
        if ch.model:
            refs[ch.name] = f"models:/{ch.model}@{ch.alias}"
            if self.challenger_key():  # the challenger: followed and preloaded like the champion (serving.canary)
                refs[self.challenger_key()] = f"models:/{self.challenger_key()}"
        return refs

    def challenger_key(self) -> str | None:
        """The name the challenger is followed under (``<model>@challenger``), or None without a canary."""
        ch = self.args.champion
        return f"{ch.model}@{self.args.canary.alias}" if ch.model and self.args.canary.share > 0 else None

    def served(self) -> set[str]:
        """Names this server answers to without a registry lookup: base, configured adapters, the champion."""
        return {BASE, *self.configured()}

    def ref_for(self, name: str) -> str:
        """The reference a model name stands for.

        Raises:
            UnknownModel: not configured, and not a registry reference this server accepts.
        """
        refs = self.configured()
        if name in refs:
            return refs[name]
        if not MODEL_NAME.match(name):
            raise UnknownModel(
                f"model {name[:80]!r} is not a model name: use 'base', one of {sorted(refs)}, <registered model>, "
                "<registered model>@<alias> or <registered model>/<version>"
            )
        if self.args.allow_registry_refs and self.args.resolved_tracking_uri():
            # a bare registered model name means its champion alias
            return f"models:/{name}" if "@" in name or "/" in name else f"models:/{name}@{self.args.champion.alias}"
        raise UnknownModel(f"model {name!r} is not served here; GET /v1/models lists 'base' and {sorted(refs)}")

    def visible(self, name: str, tenant: Tenant | None) -> bool:
        """Whether ``tenant`` may use ``name`` (None: no tenant, everything): configured names and registry models
        without a tenant prefix are everyone's; ``<tenant>--…`` models are their tenant's, and everyone's with
        ``sees_shared`` once tagged ``lorafleet.shared`` (as of the last registry listing, ``champion.poll_s``)."""
        if tenant is None or name in self.served():
            return True
        owner = owner_of(name)
        if owner is None or owner == tenant.name:
            return True
        return tenant.sees_shared and self.catalog.shared(name.split("@", 1)[0].split("/", 1)[0])

    def resolve(self, name: str, tenant: Tenant | None = None, wait_s: float | None = None) -> ResolvedAdapter | None:
        """None for the base model; else the verified adapter ``name`` means now, for ``tenant`` (None: anyone).

        A name resolved before is answered from the cache (looked up again in the background once older than
        ``ttl_s``); a registry name seen for the first time waits at most ``wait_s`` (default
        ``registry_deadline_s``; 0: not at all) for its look-up and download, and not at all while the registry is
        down.

        Raises:
            UnknownModel (also: another tenant's adapter, worded as a missing one), AdapterUnavailable (503 with
            ``retry_after_s``: the registry is down or slower than the wait), AdapterError (the adapter failed
            verification).
        """
        if name == BASE:
            return None
        if not self.visible(name, tenant):
            raise UnknownModel(f"model {name!r} is not served here; GET /v1/models lists the models you can use")
        ref = self.ref_for(name)
        hit = self._cache.get(name)  # no lock: a dict read, and one slow fetch must not hold up the others
        if hit is not None:
            if _moves(ref) and hit.expires <= time.monotonic() and self.watch.may_retry():
                self._start(name, ref)  # stale-while-revalidate: this request is served what was known
            return hit.adapter
        if not ref.startswith(("runs:/", "models:/")):  # a configured folder: verified here, no registry
            resolved = self._fetch(name, ref, gated=False)
            self._store(name, resolved)
            return resolved
        if not self.args.resolved_tracking_uri():
            raise AdapterUnavailable(f"{ref} needs MLflow: set tracking_uri in the serve config or MLFLOW_TRACKING_URI")
        return self._wait(name, ref, self.watch.deadline_s if wait_s is None else wait_s)

    def pending(self, name: str, tenant: Tenant | None = None) -> Future | None:
        """The registry fetch a request for ``name`` has to wait for (started now), or None when ``resolve`` answers
        without waiting. Lets an async caller wait for it without holding a thread, then call ``resolve(wait_s=0)``."""
        try:
            if name == BASE or name in self._cache or not self.visible(name, tenant):
                return None
            ref = self.ref_for(name)
        except UnknownModel:
            return None
        if not ref.startswith(("runs:/", "models:/")) or not self.args.resolved_tracking_uri():
            return None
        with self._lock:
            running = self._fetches.get(name)
            if running is not None and running.done and time.monotonic() - running.done > self.watch.retry_s:
                running = None  # an old answer: as in _wait, a new look-up (when the registry answers)
        if running is not None:
            return running.future if not running.future.done() else None
        return None if self.watch.down() else self._start(name, ref).future

    def _wait(self, name: str, ref: str, wait_s: float) -> ResolvedAdapter:
        """A registry name not in the cache: its fetch's answer within ``wait_s``, or a 503 at once while the
        registry is down."""
        retry = self.watch.retry_after_s()
        with self._lock:
            running = self._fetches.get(name)
            if running is not None and running.done and time.monotonic() - running.done > self.watch.retry_s:
                running = None  # an answer older than a retry interval is not this request's
        if running is None or not running.future.done():
            if self.watch.down():  # no waiting, also not for a retry in progress
                if running is None and self.watch.may_retry():
                    self._start(name, ref)  # in the background; the client retries after `retry`
                raise AdapterUnavailable(  # not the watch's error text: another request's, perhaps with paths
                    f"model {name!r} ({ref}) is not available: the MLflow registry at {self.watch.uri} "
                    f"{self.watch.problem()} and this replica has not resolved it before; 'base' and adapters "
                    f"already resolved still serve; retry after {retry} s",
                    retry,
                )
            running = running or self._start(name, ref)
        future = running.future
        wait([future], timeout=wait_s)
        if not future.done():
            if time.monotonic() - running.started >= self.watch.deadline_s:  # this request, or one before, waited
                # so the next ones do not: the registry counts as down, unless another call answered meanwhile
                self.watch.timed_out(self.watch.deadline_s, since=time.time() - (time.monotonic() - running.started))
            raise AdapterUnavailable(
                f"model {name!r} ({ref}) is still being fetched from the MLflow registry at {self.watch.uri} "
                f"(waited {wait_s:g} s, registry_deadline_s); retry after {retry} s",
                retry,
            )
        # the finished fetch stays for retry_s (then it expires, above): every request waiting on it gets its answer
        exc = future.exception()
        if exc is None:
            return future.result()
        if isinstance(exc, NotInRegistry):
            raise UnknownModel(f"model {name!r} is not served here: {exc}; GET /v1/models lists the models") from exc
        if isinstance(exc, (UnknownModel, AdapterError)):
            raise exc
        what = "refused this server's credentials" if refused_credentials(exc) else "did not answer"
        raise AdapterUnavailable(
            f"model {name!r} ({ref}) cannot be fetched: the MLflow registry at {self.watch.uri} {what} "
            f"({str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}); retry after {retry} s",
            retry,
        ) from exc

    def _start(self, name: str, ref: str) -> _Fetch:
        """The fetch of ``name`` in progress, or a new one on a registry thread."""
        with self._lock:
            running = self._fetches.get(name)
            if running is not None and not running.future.done():
                return running
            now = time.monotonic()  # forget answers older than a retry interval: clients choose the names asked
            for old in [n for n, f in self._fetches.items() if f.done and now - f.done > self.watch.retry_s]:
                del self._fetches[old]
            future = self.watch.submit(self._fetch_and_store, name, ref, name not in self.configured())
            fetch = self._fetches[name] = _Fetch(future, now)
            future.add_done_callback(lambda _: setattr(fetch, "done", time.monotonic()))
            return fetch

    def _fetch_and_store(self, name: str, ref: str, gated: bool) -> ResolvedAdapter:
        """On a registry thread: look ``name`` up, download and verify; the cache keeps the answer. A failure keeps
        what the cache had (served until the registry answers again); a registry that says the name is gone drops
        it."""
        try:
            resolved = self._fetch(name, ref, gated)
        except (NotInRegistry, UnknownModel):
            with self._lock:
                self._cache.pop(name, None)
            raise
        except Exception as exc:
            with self._lock:
                hit = self._cache.get(name)
                if hit is not None:  # keep serving it; try again after a retry interval
                    log.warning("keeping %s at %s: %s", name, hit.adapter.version or hit.adapter.ref, exc)
                    self._cache[name] = replace(hit, expires=time.monotonic() + self.watch.retry_s)
            raise
        self._store(name, resolved)
        return resolved

    def _store(self, name: str, resolved: ResolvedAdapter) -> None:
        expires = time.monotonic() + self.ttl_s if self.ttl_s > 0 else float("inf")
        with self._lock:
            self._cache[name] = _Hit(resolved, expires, time.time())

    def _fetch(self, name: str, ref: str, gated: bool) -> ResolvedAdapter:
        """``gated``: a client's own reference, so a version the gate rejected (or one rolled back) that no alias
        holds is refused. Registry references run on a registry thread (``_fetch_and_store``)."""
        uri = self.args.resolved_tracking_uri()
        if ref.startswith(("runs:/", "models:/")) and not uri:
            raise AdapterUnavailable(f"{ref} needs MLflow: set tracking_uri in the serve config or MLFLOW_TRACKING_URI")
        if is_folder_ref(ref) and (why := self.args.outside_roots(Path(project_path(ref)))):
            raise AdapterError(why)  # checked again here: a symlink may have been swapped since start-up
        if not ref.startswith("models:/"):
            with self._download if ref.startswith("runs:/") else contextlib.nullcontext():  # a folder: no lock
                f = fetch_adapter(ref, self.cache_dir, uri, expected_base=self.base_model)
            return ResolvedAdapter(name, ref, f.path, f.meta, f.version)
        version = resolve_version(client_for(uri), ref)  # one metadata call; NotInRegistry when it names nothing
        pinned = parse_model_ref(ref)[2] is not None
        if gated and pinned and (why := unservable(version)):
            raise UnknownModel(why)
        number, sha = str(version.version), (version.tags or {}).get(TAG_SHA)
        with self._download:
            for hit in list(self._cache.values()):  # the same version under any name: no second download
                other = hit.adapter
                if other.registered == version.name and other.version == number and other.meta.sha256 == sha:
                    return replace(other, name=name, ref=ref)
            f = fetch_adapter(f"models:/{version.name}/{number}", self.cache_dir, uri, expected_base=self.base_model)
        return ResolvedAdapter(name, ref, f.path, f.meta, f.version, version.name)

    def refresh(self) -> dict[str, str]:
        """Look the registry up again now — the catalog and every configured alias (the champion) — each waited for
        at most ``registry_deadline_s`` (a replica's start, its poll, ``POST /admin/reload``). A name whose look-up
        fails keeps the version it had. Returns name -> version, or ``"error: …"``."""
        with self._lock:  # other registry names are looked up again on their next request
            self._cache = {n: replace(h, expires=0.0) if _moves(h.adapter.ref) else h for n, h in self._cache.items()}
        listing = self.catalog.start()
        refs = {n: r for n, r in self.configured().items() if _moves(r)}
        uri = self.args.resolved_tracking_uri()
        futures = {n: self._start(n, r).future for n, r in refs.items()} if uri else {}
        out = {}
        for name in refs:
            try:
                if name not in futures:
                    raise AdapterUnavailable("no tracking URI: set tracking_uri (serve config) or MLFLOW_TRACKING_URI")
                r = self.watch.wait(futures[name])
                out[name] = r.version or r.ref
            except Exception as exc:  # noqa: BLE001 - reported per name; the cache keeps what it had
                if name == self.challenger_key() and isinstance(exc, (NotInRegistry, UnknownModel)):
                    with self._lock:  # no challenger alias (none set, or promoted / cleared): the canary has no arm
                        self._cache.pop(name, None)
                    out[name] = "none: no challenger alias"
                    continue
                hit = self._cache.get(name)
                kept = f" (still serving version {hit.adapter.version})" if hit else ""
                out[name] = f"error: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}{kept}"
        if listing is not None:
            self.catalog.wait(listing)
        return out

    def known(self) -> dict[str, ResolvedAdapter]:
        """Names resolved so far (for /v1/models; a snapshot taken without waiting for a fetch in progress)."""
        return {name: hit.adapter for name, hit in dict(self._cache).items()}

    def state(self) -> dict:
        """The registry as this replica sees it, for ``/readyz`` details and ``/admin/stats``: the watch's health,
        the listing's age, and per configured registry name (the champion) the version served and the age of the
        look-up that last confirmed it (it grows while the registry is down: stale-while-revalidate)."""
        now = time.time()
        names = {}
        for name, ref in self.configured().items():
            if ref.startswith(("runs:/", "models:/")):
                hit = self._cache.get(name)
                names[name] = {
                    "ref": ref,
                    "version": hit.adapter.version if hit else None,
                    "age_s": round(now - hit.at, 1) if hit else None,
                    "stale": bool(hit and _moves(ref) and now - hit.at > max(self.ttl_s, self.watch.retry_s) + 1),
                }
        return {"registry": self.watch.health() | self.catalog.state(), "names": names}

    def close(self) -> None:
        """Stop the registry threads (a call in progress ends on its own)."""
        self.watch.close()


def public_state(state: dict) -> dict:
    """``AdapterResolver.state()`` for anyone (``GET /readyz`` needs no key; ``/v1/models`` goes to every tenant):
    whether the registry answers and how old each answer is — not its URI, error texts or references, which may name
    hosts, credentials and server paths (those stay in ``/admin/stats``)."""
    registry = {k: v for k, v in (state.get("registry") or {}).items() if k != "uri" and not k.endswith("error")}
    names = {n: {k: v for k, v in d.items() if k != "ref"} for n, d in (state.get("names") or {}).items()}
    return {"registry": registry, "names": names}


def _moves(ref: str) -> bool:
    """References to look up again after ``ttl_s``: registry aliases move, and a pinned version's status can change
    (rolled back); an unchanged version is not downloaded again."""
    return ref.startswith("models:/")
