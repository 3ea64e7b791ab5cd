"""Which registry names a Serve app lists: every lorafleet registered model's champion, its other aliases and its
gated versions, read from MLflow at most once per ``champion.poll_s`` seconds (and at once on ``POST /admin/reload``).

    catalog = RegistryCatalog(args)     # reads nothing until asked
    catalog.refresh()                   # read now, waiting at most registry_deadline_s (a replica's start, its poll)
    catalog.entries()                   # [Entry(id="toy-ohwx-lora", model="toy-ohwx-lora", version="2", ...), ...]
    model_cards(resolver, loaded_keys)  # the cards of GET /v1/models

Reading never waits for the registry: ``entries`` answers from the last good listing and, when that is older than
``champion.poll_s``, reads it again on a registry thread (``serving.registry_watch``), so ``GET /v1/models`` answers
at once with what the replica knows while the registry is down, its registry-backed cards marked
``available: false`` unless the replica resolved them before.

For each registered model tagged ``lorafleet.adapter_model=true`` (``evaluation.registry.register`` tags it), plus
the configured champion's model and the models configured ``models:/`` references name:

| id | when |
| --- | --- |
| ``<model>`` | it has a ``champion.alias`` alias (the bare name means that alias) |
| ``<model>@<alias>`` | every other alias (previous, challenger, ...) |
| ``<model>/<version>`` | the version passed the gate (``validation_status=passed``) or holds an alias |

Each entry carries its tenant (``owner``: the ``<tenant>--`` prefix of its registered model, serving/tenants.py) and
whether the model is tagged ``lorafleet.shared=true``; ``model_cards`` lists a tenant only what it may use.

Rejected and rolled-back versions that hold no alias are never listed (and asking for one by number is a 404,
``evaluation.registry.unservable``); versions without a status tag are served when asked for but not listed.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace

from serving.config import BASE, MODEL_NAME, ServeArgs
from serving.registry_watch import RegistryWatch
from serving.tenants import TAG_SHARED, Tenant, owner_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    id: str  # the name a client sends
    ref: str  # the models:/ reference it stands for
    model: str  # registered model
    version: str
    aliases: tuple[str, ...]  # every alias the version holds
    status: str | None  # validation_status tag: passed | rejected | rolled_back; None when untagged
    sha256: str | None  # adapter_sha256 tag: the key of the adapter once loaded
    owner: str | None = None  # tenant of the registered model (its <tenant>-- prefix); None: the operator's
    shared: bool = False  # the registered model is tagged lorafleet.shared=true

    def card(self) -> dict:
        return {"registered_model": self.model, "version": self.version, "aliases": list(self.aliases),
                "status": self.status}  # fmt: skip


class RegistryCatalog:
    """A cached listing of the registry; thread-safe. Reads never wait for the registry: they answer from the last
    good listing, and one older than ``champion.poll_s`` is read again on a registry thread (``RegistryWatch``)."""

    def __init__(self, args: ServeArgs, watch: RegistryWatch | None = None):
        self.uri = args.resolved_tracking_uri()
        self.enabled = bool(self.uri and args.allow_registry_refs)
        self.alias = args.champion.alias
        self.ttl_s = args.champion.poll_s
        refs = [r for r in args.adapters.values() if r.startswith("models:/")]
        self.always = sorted({*([args.champion.model] if args.champion.model else []), *(_model_of(r) for r in refs)})
        self.taken = {BASE, *args.adapters, *([args.champion.name] if args.champion.model else [])}
        self.watch = watch or RegistryWatch(self.uri, args.registry_deadline_s, args.registry_retry_s)
        self.error: str | None = None  # why the last read failed (the listing before it is kept)
        self.read_at: float | None = None  # time.time() of the last good listing
        self._entries: list[Entry] = []
        self._refs: dict[str, Entry] = {}  # models:/m@alias and models:/m/version -> what it points at
        self._shared: frozenset[str] = frozenset()  # registered models tagged lorafleet.shared=true
        self._expires = float("-inf")
        self._future: Future | None = None
        self._lock = threading.Lock()

    def entries(self) -> list[Entry]:
        """The listed ids as of the last good listing (empty before the first; ``refresh`` reads one)."""
        self._revalidate()
        return self._entries

    def describe(self, ref: str) -> Entry | None:
        """What a ``models:/`` reference pointed at when the registry was last read (aliases and unlisted versions
        included), or None."""
        self._revalidate()
        return self._refs.get(ref)

    def shared(self, model: str) -> bool:
        """Whether registered model ``model`` was tagged ``lorafleet.shared=true`` when the registry was last read."""
        self._revalidate()
        return model in self._shared

    def answered(self) -> bool:
        """Whether the last read of the listing got an answer (False before the first, and while it fails)."""
        return self.enabled and self.read_at is not None and self.error is None

    def refresh(self, deadline_s: float | None = None) -> bool:
        """Read the listing now, waiting at most ``deadline_s`` (default ``registry_deadline_s``); True when it
        answered. The last good listing is kept when it does not."""
        future = self.start()
        return True if future is None else self.wait(future, deadline_s)

    def start(self) -> Future | None:
        """Start reading the listing on a registry thread (or join the read in progress); None when disabled."""
        if not self.enabled:
            return None
        with self._lock:
            if self._future is None or self._future.done():
                self._future = self.watch.submit(self._read)
            return self._future

    def wait(self, future: Future, deadline_s: float | None = None) -> bool:
        """Whether the read ``future`` answered within ``deadline_s`` (default ``registry_deadline_s``)."""
        try:
            self.watch.wait(future, deadline_s)
            return True
        except Exception:  # noqa: BLE001 - recorded in self.error / the watch; the last listing is kept
            return False

    def state(self) -> dict:
        """The listing's age and last error, for ``/readyz`` details and ``/admin/stats``."""
        age = None if self.read_at is None else round(time.time() - self.read_at, 1)
        return {"listing_age_s": age, "listing_error": self.error} if self.enabled else {}

    def _revalidate(self) -> None:
        if self.enabled and time.monotonic() >= self._expires and self.watch.may_retry():
            self.start()

    def _read(self) -> None:
        """On a registry thread: the whole listing, swapped in at once when it is read."""
        try:
            entries, refs, shared = self._listing()
        except Exception as exc:  # the registry is away: keep the last listing, retry after registry_retry_s
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            self._expires = time.monotonic() + self.watch.retry_s
            raise
        self._entries, self._refs, self._shared = entries, refs, shared
        self.error, self.read_at = None, time.time()
        self._expires = time.monotonic() + self.ttl_s if self.ttl_s > 0 else float("inf")

    def _listing(self) -> tuple[list[Entry], dict[str, Entry], frozenset[str]]:
        from mlflow.exceptions import MlflowException

        from evaluation.registry import MISSING_CODES, adapter_models, client_for

        client = client_for(self.uri)
        models = {m.name: m for m in adapter_models(client)}
        for name in self.always:  # configured models, tagged or not (registered before the tag existed)
            if name not in models:
                try:
                    models[name] = client.get_registered_model(name)
                except MlflowException as exc:
                    if exc.error_code not in MISSING_CODES:
                        raise
        entries: list[Entry] = []
        refs: dict[str, Entry] = {}
        shared = frozenset(n for n, m in models.items() if (m.tags or {}).get(TAG_SHARED) == "true")
        for name in sorted(models):
            if MODEL_NAME.match(name) and "@" not in name and "/" not in name:  # a name a client can send
                listed, described = self._model(client, models[name], name in shared)
                entries += listed
                refs.update(described)
        return entries, refs, shared

    def _model(self, client, model, shared: bool) -> tuple[list[Entry], dict[str, Entry]]:
        """One registered model's listed entries and every reference to it."""
        from evaluation.registry import TAG_SHA, TAG_STATUS

        name = model.name
        versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
        held: dict[str, list[str]] = {}  # version -> its aliases (search results carry none)
        for alias, number in (model.aliases or {}).items():
            held.setdefault(str(number), []).append(alias)

        def entry(ident: str, ref: str, number: str) -> Entry:
            v = versions[number]
            tags = v.tags or {}
            return Entry(ident, ref, name, number, tuple(sorted(held.get(number, []))), tags.get(TAG_STATUS),
                         tags.get(TAG_SHA), owner_of(name), shared)  # fmt: skip

        listed, refs = [], {}
        for alias, number in sorted((model.aliases or {}).items(), key=lambda a: (a[0] != self.alias, a[0])):
            if str(number) not in versions:
                continue
            refs[f"models:/{name}@{alias}"] = e = entry(f"{name}@{alias}", f"models:/{name}@{alias}", str(number))
            if alias == self.alias and name not in self.taken:
                listed.append(replace(e, id=name))  # the bare name means this alias
            elif MODEL_NAME.match(e.id):
                listed.append(e)
        for number in sorted(versions, key=int):
            refs[f"models:/{name}/{number}"] = e = entry(f"{name}/{number}", f"models:/{name}/{number}", number)
            if e.status == "passed" or e.aliases:
                listed.append(e)
        return listed, refs


def _model_of(ref: str) -> str:
    body = ref.removeprefix("models:/")
    return body.rsplit("@", 1)[0] if "@" in body else body.rsplit("/", 1)[0]


def model_cards(resolver, loaded: set[str], tenant: Tenant | None = None) -> list[dict]:
    """The ``GET /v1/models`` cards: ``base``, the configured names (the champion among them), then the registry's
    entries ``tenant`` may use (None: all). ``resolver`` is the engine's ``AdapterResolver``; ``loaded`` the keys
    (sha256) of loaded adapters. ``available``: a request for the name can be served now — false for a registry
    name this replica has not resolved while the registry does not answer. Never waits for the registry."""
    known = resolver.known()
    up = not resolver.watch.down()
    cards = [{"id": BASE, "kind": "base", "ref": resolver.args.base_model, "loaded": True, "available": True}]
    for name, ref in resolver.configured().items():
        r = known.get(name)
        card = {"id": name, "kind": "adapter", "ref": ref, "version": r.version if r else None}
        e = resolver.catalog.describe(ref) if ref.startswith("models:/") else None
        if e is not None and (r is None or r.version == e.version):  # what it serves, as the registry describes it
            card |= e.card()
        card["loaded"] = bool(r and r.key in loaded) or bool(e and e.sha256 in loaded)
        card["available"] = r is not None or up or not ref.startswith(("runs:/", "models:/"))
        cards.append(card)
    configured = resolver.configured()
    for e in resolver.catalog.entries():
        if e.id in configured:  # listed above (the canary's <model>@challenger)
            continue
        if tenant is not None and not tenant.sees(e.owner, e.shared):
            continue
        cards.append({"id": e.id, "kind": "registry", "ref": e.ref, **e.card(), "loaded": e.sha256 in loaded,
                      "available": e.id in known or up})  # fmt: skip
    return cards


def configured_cards(args: ServeArgs) -> list[dict]:
    """The cards the ingress can list without a generator replica: ``base`` and the configured names, registry-backed
    ones marked ``available: false`` (nobody could say whether they resolve now)."""
    refs = dict(args.adapters) | ({args.champion.name: f"models:/{args.champion.model}@{args.champion.alias}"}
                                  if args.champion.model else {})  # fmt: skip
    cards = [{"id": BASE, "kind": "base", "ref": args.base_model, "available": True}]
    for name, ref in refs.items():
        registry = ref.startswith(("runs:/", "models:/"))
        cards.append({"id": name, "kind": "adapter", "ref": ref, "available": not registry})
    return cards
