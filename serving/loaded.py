"""The adapters loaded into one pipeline (moved out of serving/adapters.py, which resolves names).

``LoadedAdapters`` is the bounded LRU of adapters loaded into one pipeline: a miss loads with the plain diffusers
call, an eviction deletes the adapter's layers (never fuse/unfuse: the replica is shared). With ``hotswap`` (a
compiled UNet, ``speed.compile_unet``) the adapters live in fixed slots ``slot0…``: once all are taken, a miss
loads into the least recently used slot with diffusers' ``load_lora_weights(..., hotswap=True)``, which replaces
the weights in place, so the compiled graph is kept.
"""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from pathlib import Path

import torch

from serving.adapters import ResolvedAdapter
from training.adapter import AdapterError, load_adapter, verify_adapter

log = logging.getLogger(__name__)


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
