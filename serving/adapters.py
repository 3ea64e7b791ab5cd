"""Which adapter a model name means, and which adapters a pipeline holds.

``AdapterResolver`` turns the name a client sends (``champion``, a configured name, a registered model's name
``toy-ohwx-lora`` = its ``champion.alias``, ``toy-sks-lora@previous``, ``toy-sks-lora/3``) into a verified local
folder: configured folders, ``runs:/`` and ``models:/`` references go through ``evaluation.registry.fetch_adapter``
(safetensors only, sha256 checked against the adapter's JSON and the registry's tag, base model checked). Clients
never name paths. A tenant (``serving.tenants``) resolves only names it may see: configured ones, registry models
without a tenant prefix, its own ``<tenant>--…`` and those marked shared; another tenant's is ``UnknownModel`` worded
the same whether it exists or not. A name the registry does not hold, and a version asked for by number that the
gate rejected or that was rolled back (and no alias holds), is ``UnknownModel`` (404) at once; a registry that cannot
be reached is ``AdapterUnavailable`` (503, retryable) unless an earlier answer is still at hand.

``LoadedAdapters`` is the bounded LRU of adapters loaded into one pipeline: a miss loads with the plain diffusers
call, an eviction deletes the adapter's layers (never fuse/unfuse: the replica is shared). With ``hotswap`` (a
compiled UNet, ``speed.compile_unet``) the adapters live in fixed slots ``slot0…``: once all are taken, a miss
loads into the least recently used slot with diffusers' ``load_lora_weights(..., hotswap=True)``, which replaces
the weights in place, so the compiled graph is kept.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from evaluation.registry import (
    TAG_SHA,
    NotInRegistry,
    RegistryError,
    client_for,
    fetch_adapter,
    parse_model_ref,
    resolve_version,
    unservable,
)
from serving.catalog import RegistryCatalog
from serving.config import BASE, MODEL_NAME, ServeArgs, is_folder_ref, project_path
from serving.tenants import Tenant, owner_of
from training.adapter import AdapterError, AdapterMeta, load_adapter, verify_adapter

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    """The name is not served here (HTTP 404)."""


class AdapterUnavailable(RuntimeError):
    """The name is served here but its adapter cannot be fetched right now, e.g. the registry is down (HTTP 503)."""


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


class AdapterResolver:
    """Model name -> verified local adapter folder, cached; registry aliases are looked up again after ``ttl_s``."""

    def __init__(self, args: ServeArgs, base_model: str, cache_dir: Path, ttl_s: float | None = None):
        self.args = args
        self.base_model = base_model
        self.cache_dir = cache_dir
        self.ttl_s = args.champion.poll_s if ttl_s is None else ttl_s
        self._cache: dict[str, tuple[ResolvedAdapter, float]] = {}
        self._lock = threading.Lock()
        self.catalog = RegistryCatalog(args)  # what /v1/models lists from the registry

    def configured(self) -> dict[str, str]:
        """Names served without asking: configured adapters and the champion."""
        refs = dict(self.args.adapters)
        ch = self.args.champion
        if ch.model:
            refs[ch.name] = f"models:/{ch.model}@{ch.alias}"
        return refs

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

    def resolve(self, name: str, tenant: Tenant | None = None) -> ResolvedAdapter | None:
        """None for the base model; else the verified adapter ``name`` means now, for ``tenant`` (None: anyone).

        Raises:
            UnknownModel (also: another tenant's adapter, worded as a missing one), AdapterUnavailable, AdapterError
            (the adapter failed verification).
        """
        if name == BASE:
            return None
        if not self.visible(name, tenant):
            raise UnknownModel(f"model {name!r} is not served here; GET /v1/models lists the models you can use")
        ref = self.ref_for(name)
        hit = self._cache.get(name)  # a fresh answer needs no lock: one slow fetch must not hold up the others
        if hit and (hit[1] > time.monotonic() or not _moves(ref)):
            return hit[0]
        with self._lock:  # one fetch at a time (two names may download the same version into one folder)
            hit = self._cache.get(name)
            if hit and (hit[1] > time.monotonic() or not _moves(ref)):
                return hit[0]
            try:
                resolved = self._fetch(name, ref, gated=name not in self.configured())
            except (NotInRegistry, UnknownModel) as exc:  # the registry answered: nothing to serve under this name
                self._cache.pop(name, None)
                if isinstance(exc, UnknownModel):
                    raise
                raise UnknownModel(
                    f"model {name!r} is not served here: {exc}; GET /v1/models lists the models"
                ) from exc
            except (RegistryError, AdapterUnavailable) as exc:
                if hit:  # keep serving what we had while the registry is away
                    log.warning("keeping %s at %s: %s", name, hit[0].version or hit[0].ref, exc)
                    self._cache[name] = (hit[0], time.monotonic() + max(self.ttl_s, 1.0))
                    return hit[0]
                raise AdapterUnavailable(f"model {name!r} ({ref}) cannot be fetched: {exc}") from exc
            expires = time.monotonic() + self.ttl_s if self.ttl_s > 0 else float("inf")
            self._cache[name] = (resolved, expires)
            return resolved

    def _fetch(self, name: str, ref: str, gated: bool) -> ResolvedAdapter:
        """Called under the lock. ``gated``: a client's own reference, so a version the gate rejected (or one rolled
        back) that no alias holds is refused."""
        uri = self.args.resolved_tracking_uri()
        if ref.startswith(("runs:/", "models:/")) and not uri:
            raise AdapterUnavailable(f"{ref} needs MLflow: set tracking_uri in the serve config or MLFLOW_TRACKING_URI")
        if is_folder_ref(ref) and (why := self.args.outside_roots(Path(project_path(ref)))):
            raise AdapterError(why)  # checked again here: a symlink may have been swapped since start-up
        if not ref.startswith("models:/"):
            f = fetch_adapter(ref, self.cache_dir, uri, expected_base=self.base_model)
            return ResolvedAdapter(name, ref, f.path, f.meta, f.version)
        version = resolve_version(client_for(uri), ref)  # one metadata call; NotInRegistry when it names nothing
        pinned = parse_model_ref(ref)[2] is not None
        if gated and pinned and (why := unservable(version)):
            raise UnknownModel(why)
        number, sha = str(version.version), (version.tags or {}).get(TAG_SHA)
        for other, _ in self._cache.values():  # the same version under any name: no second download
            if other.registered == version.name and other.version == number and other.meta.sha256 == sha:
                return replace(other, name=name, ref=ref)
        f = fetch_adapter(f"models:/{version.name}/{number}", self.cache_dir, uri, expected_base=self.base_model)
        return ResolvedAdapter(name, ref, f.path, f.meta, f.version, version.name)

    def refresh(self) -> dict[str, str]:
        """Look registry aliases up again now (the champion moved); returns name -> version or error."""
        with self._lock:  # expire every alias lookup
            self._cache = {n: (r, 0.0 if _moves(r.ref) else t) for n, (r, t) in self._cache.items()}
        self.catalog.entries(force=True)
        out = {}
        for name in [n for n, r in self.configured().items() if _moves(r)]:
            try:
                r = self.resolve(name)
                out[name] = (r.version or r.ref) if r else BASE
            except (UnknownModel, AdapterUnavailable, AdapterError) as exc:
                out[name] = f"error: {exc}"
        return out

    def known(self) -> dict[str, ResolvedAdapter]:
        """Names resolved so far (for /v1/models; a snapshot taken without waiting for a fetch in progress)."""
        return {name: r for name, (r, _) in dict(self._cache).items()}


def _moves(ref: str) -> bool:
    """References to look up again after ``ttl_s``: registry aliases move, and a pinned version's status can change
    (rolled back); an unchanged version is not downloaded again."""
    return ref.startswith("models:/")


class LoadedAdapters:
    """At most ``capacity`` adapters in the pipeline; least recently used goes first."""

    def __init__(self, pipe, capacity: int, on_change=None, hotswap: bool = False, hotswap_max_rank: int = 64):
        self.pipe = pipe
        self.capacity = capacity
        self.hotswap = hotswap
        self.hotswap_max_rank = hotswap_max_rank
        self.on_change = on_change  # called after a load or an eviction (the engine re-hooks LoRA layers)
        self._slots: OrderedDict[str, str] = OrderedDict()  # key -> PEFT adapter name
        self.hits = self.misses = self.evictions = 0

    @staticmethod
    def slot_name(key: str) -> str:
        return f"a{key[:16]}"  # PEFT adapter names are module keys: no dots

    def __contains__(self, key: str) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def keys(self) -> list[str]:
        """Keys (weights sha256) of the loaded adapters, least recently used first."""
        return list(self._slots)

    def ensure(self, adapters: list[ResolvedAdapter]) -> dict[str, str | AdapterError]:
        """Load what is missing (evicting others), mark all as used; returns key -> slot, or the
        ``AdapterError`` of an adapter that failed to load (the others load and serve as usual).

        Raises:
            ValueError: more distinct adapters than ``capacity`` (the engine splits batches before this).
        """
        unique = {a.key: a for a in adapters}
        failed: dict[str, AdapterError] = {}
        if len(unique) > self.capacity:
            raise ValueError(f"{len(unique)} adapters in one pass > max_adapters {self.capacity}")
        for key, adapter in unique.items():
            if key in self._slots:
                self.hits += 1
                self._slots.move_to_end(key)
                continue
            self.misses += 1
            if self.hotswap:
                try:  # before a slot is chosen: a refused adapter leaves every slot as it was
                    self._check_hot_swappable(adapter)
                except AdapterError as exc:
                    log.warning("adapter %s refused: %s", adapter.name, exc)
                    failed[key] = exc
                    continue
            if self.hotswap and len(self._slots) >= self.capacity:
                victim = next(k for k in self._slots if k not in unique)
                slot, swap = self._slots.pop(victim), True
                self.evictions += 1
            else:
                while len(self._slots) >= self.capacity:
                    self.evict(next(k for k in self._slots if k not in unique))
                slot, swap = self._free_slot(key), False
            try:
                self._load(adapter, slot, swap)
            except AdapterError as exc:
                log.warning("adapter %s refused: %s", adapter.name, exc)
                failed[key] = exc
                continue
            self._slots[key] = slot
            if self.on_change:
                self.on_change()
        return {key: failed.get(key) or self._slots[key] for key in unique}

    def _free_slot(self, key: str) -> str:
        if not self.hotswap:
            return self.slot_name(key)
        taken = set(self._slots.values())
        return next(f"slot{i}" for i in range(self.capacity + 1) if f"slot{i}" not in taken)

    def _load(self, adapter: ResolvedAdapter, slot: str, swap: bool) -> None:
        """Load ``adapter`` as ``slot``; ``swap``: replace the weights of the adapter already in ``slot`` in place.

        Raises:
            AdapterError: it failed verification or does not fit (a failed swap leaves the slot deleted).
        """
        if not swap:
            load_adapter(self.pipe, adapter.path, slot)
            return
        meta = verify_adapter(adapter.path)  # the sha256 again, just before the weights are read
        try:
            self.pipe.load_lora_weights(str(adapter.path), weight_name=meta.weights, adapter_name=slot, hotswap=True)
        except Exception as exc:  # noqa: BLE001 - a file the swap refuses (rank above hotswap_max_rank, other targets)
            self.pipe.delete_adapters(slot)
            if self.on_change:
                self.on_change()
            raise AdapterError(
                f"adapter {adapter.name!r} cannot be hot-swapped into the compiled UNet ({type(exc).__name__}: "
                f"{str(exc)[:300]}); a hot swap needs the target modules of the slot's previous adapter (diffusers "
                "refuses other ones): serve it without speed.compile_unet"
            ) from exc

    def _check_hot_swappable(self, adapter: ResolvedAdapter) -> None:
        """What diffusers' hot swap cannot take, refused before anything is loaded.

        Raises:
            AdapterError: a rank above ``speed.hotswap_max_rank`` (the slots' padded rank: a bigger one would change
                the compiled tensors' shapes) or text-encoder LoRA (diffusers hot-swaps the UNet only).
        """
        from safetensors import safe_open

        meta = verify_adapter(adapter.path)
        if meta.text_encoder:
            raise AdapterError(
                f"adapter {adapter.name!r} has text-encoder LoRA, which diffusers cannot hot-swap into a compiled "
                "pipeline: serve it without speed.compile_unet"
            )
        with safe_open(str(Path(adapter.path) / meta.weights), framework="pt") as f:
            downs = [k for k in f.keys() if k.endswith((".lora_A.weight", ".lora.down.weight", ".lora_down.weight"))]  # noqa: SIM118
            ranks = [f.get_slice(k).get_shape()[0] for k in downs]
        rank = max(ranks, default=0)
        if rank > self.hotswap_max_rank:
            raise AdapterError(
                f"adapter {adapter.name!r} has LoRA rank {rank} > speed.hotswap_max_rank {self.hotswap_max_rank} (the "
                f"compiled slots' rank): set speed.hotswap_max_rank to at least {rank}, or serve it without "
                "speed.compile_unet"
            )

    def evict(self, key: str) -> None:
        slot = self._slots.pop(key)
        self.pipe.delete_adapters(slot)
        self.evictions += 1
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.on_change:
            self.on_change()
