"""Per-pass LoRA routing for a pipeline that holds several PEFT adapters: the cheapest exact path for each pass.

- **base**: every sample uses the bare base model: the LoRA layers are disabled (PEFT's ``enable_adapters(False)``),
  so each returns its base layer's output, bit-identical to a pipeline without adapters.
- **single**: every sample uses one adapter. With ``merge_single`` (the default), each ``nn.Linear`` LoRA layer runs
  on a merged weight ``W + scale · B A`` (PEFT's ``get_delta_weight``, summed in fp32, stored in W's dtype) swapped in
  for the pass in place of the base layer's weight *object* and swapped back afterwards — the shared base weights are
  never written, so a later base pass is still bit-identical — and the merged copies of the most recent adapter are
  kept for the next single pass (memory: one copy of the LoRA-targeted base weights). A single-adapter pass then
  costs what a base-only pass costs (PEFT's unmerged forward adds ~5 small ops per projection: 0.91× base throughput
  on the toy UNet). Layers it cannot merge (see ``batchable``) and ``merge_single=False`` use PEFT's active adapter
  (``set_adapter``). Merged and unmerged differ by float rounding only (each image within 1/255: tested).
- **mixed**: the samples use different adapters (or the base). PEFT's own mixed-batch forward (``adapter_names=``)
  loops over the adapters with index masks in every layer (about 4.7× the operator count of a base-only pass on the
  toy UNet). Instead, for each ``nn.Linear`` LoRA layer, every adapter's A, B (zero-padded to the pass's highest
  rank) and scale are stacked once per pass; at the layer's first call with a batch of N samples they are gathered
  per sample into ``A[N, d_in, r]`` and ``scale·B[N, r, d_out]`` (each sample's scale folded into its B), and the
  layer's base output gets ``(x A)(scale·B)`` added with one ``torch.bmm`` and one ``torch.baddbmm`` — the BGMV
  idea of Punica (Chen et al., 2023) and S-LoRA (Sheng et al., 2023) in plain PyTorch. Base samples get zero A/B.
  Layers this does not batch — LoRA on ``Conv2d`` (kohya LoCon), ``Embedding``, DoRA and other PEFT variants, LoRA
  with a bias, active dropout — keep PEFT's per-sample routing in the same pass (``fallback`` layers).

Classifier-free guidance doubles the UNet batch as ``[uncond..., cond...]`` (diffusers' SD pipeline concatenates the
negative embeddings first) while the text encoder sees one row per prompt, so the routing covers a batch of N
(``names``) and of 2N (``names + names``). SDXL's pipeline is the same shape: each of its two text encoders sees N
rows (the prompts, then the negative prompts in a call of their own, or none: zero negative embeddings), the UNet
2N, and ``added_cond_kwargs`` (pooled ``text_embeds``, ``time_ids``) are 2N rows in the same order, so a LoRA
layer anywhere in the UNet, its added-conditioning embedding included, routes by the same rule (tested:
``tests/serving/test_engine_sdxl.py``). Memory of a mixed pass: per batched layer ``N · r · (d_in + d_out)``
elements per batch size seen (SD-1.5 attention, r 16, 2N = 32, fp16: about 200 MB), freed when the pass ends.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

BASE_ROUTE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class _Stack:
    """One layer's adapters in a mixed pass: row 0 is zeros (the base), row k+1 is the pass's k-th adapter."""

    a: torch.Tensor  # [K+1, d_in, r_max], A transposed
    b: torch.Tensor  # [K+1, r_max, d_out], B transposed
    scale: torch.Tensor  # [K+1] float32: PEFT's ``scaling`` (alpha / r, or alpha / sqrt(r) for rsLoRA)
    rows: dict[str, int]  # adapter name -> row
    per_batch: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # n -> A[N], scale·B[N]


def batchable(layer: nn.Module, adapter: str) -> bool:
    """Whether ``layer``'s LoRA ``adapter`` is a plain ``x A B · scale`` on an ``nn.Linear`` that ``LoraRouter``
    can batch (no DoRA or other PEFT variant, no LoRA bias, no active dropout)."""
    from peft.tuners.lora import Linear as LoraLinear

    if type(layer) is not LoraLinear or not isinstance(layer.get_base_layer(), nn.Linear):
        return False
    if layer.merged or adapter in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter, False):
        return False
    if layer.lora_B[adapter].bias is not None:
        return False
    drop = layer.lora_dropout[adapter]
    return isinstance(drop, nn.Identity) or not (drop.training and getattr(drop, "p", 0.0) > 0)


class LoraRouter:
    """Applies each pass's routing to every PEFT ``LoraLayer`` of ``parts`` (e.g. the UNet and the text encoder).

    ``batched=False`` keeps PEFT's per-adapter masked loop for mixed passes (the path before the batched one, kept
    for comparison). ``passes`` counts passes by kind (``base``, ``single``, ``mixed``); ``calls`` counts layer calls
    by how they were routed (``batched``, ``peft_routed``) and ``merged_layers`` the layers that ran single-adapter
    passes on merged weights, so tests and benchmarks can see which path ran. ``merge_single=False`` runs single
    passes with PEFT's unmerged active adapter.
    """

    def __init__(self, parts: Sequence[nn.Module], batched: bool = True, merge_single: bool = True):
        self.parts = [p for p in parts if p is not None]
        self.batched = batched
        self.merge_single = merge_single
        self._merged: dict[int, tuple[str, torch.Tensor, nn.Parameter]] = {}  # id(layer) -> (adapter, W, W + dW)
        self._swapped: list[tuple[nn.Module, torch.Tensor]] = []  # (base layer, its own weight) during a pass
        self.layers: list[nn.Module] = []
        self._hooked: weakref.WeakSet = weakref.WeakSet()
        self._route: dict[int, list[str]] = {}  # batch size -> adapter name per sample (PEFT-routed layers)
        self._peft_routed: set[int] = set()  # id() of the layers routed by PEFT in the current pass
        self._stacks: dict[int, _Stack] = {}  # id(layer) -> its batched adapters in the current pass
        self.passes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.merged_layers = 0  # layers that ran a single-adapter pass on a merged weight, summed over passes

    def refresh(self) -> None:
        """Find the LoRA layers again and hook new ones; call after an adapter was loaded or deleted."""
        from peft.tuners.lora import LoraLayer

        self.layers = [m for part in self.parts for m in part.modules() if isinstance(m, LoraLayer)]
        self._merged = {}  # adapters changed: merged copies are made again when next needed
        for m in self.layers:
            if m not in self._hooked:
                m.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
                m.register_forward_hook(self._post_hook, with_kwargs=True)
                self._hooked.add(m)

    @staticmethod
    def kind(names: Sequence[str]) -> str:
        """``base`` (all ``BASE_ROUTE``), ``single`` (all one adapter) or ``mixed``."""
        unique = set(names)
        if unique == {BASE_ROUTE}:
            return "base"
        return "single" if len(unique) == 1 else "mixed"

    @contextmanager
    def route(self, names: Sequence[str]) -> Iterator[str]:
        """While active, sample ``i`` of every LoRA layer's batch goes through adapter ``names[i]`` (``BASE_ROUTE``:
        none), by the cheapest exact path for this mix; yields the pass kind.

        Raises:
            RuntimeError: (inside the pass) a LoRA layer saw a batch size that is neither ``len(names)`` nor twice it.
        """
        names = list(names)
        kind = self.kind(names)
        self._reset()  # whatever an earlier pass left behind (it cannot, but a pass never inherits state)
        try:  # the set-up too: a failure half-way (e.g. out of memory while merging) must restore every weight
            if kind == "base":
                self._set_layers(enabled=False)
            elif kind == "single" and self.merge_single:
                self._plan_merged(names[0])
            elif kind == "single":
                self._set_layers(enabled=True, active=names[0])
            else:
                self._route = {len(names): names, 2 * len(names): names + names}
                self._plan_mixed(names)
            self.passes[kind] += 1
            yield kind
        finally:
            self._reset()

    def _reset(self) -> None:
        """No routing, no stacks, and every swapped base layer holding its own weight tensor again (in reverse
        order of the swaps, so a layer swapped twice ends with its first, own tensor)."""
        self._route, self._peft_routed, self._stacks = {}, set(), {}
        for base, weight in reversed(self._swapped):
            base.weight = weight
        self._swapped = []

    # ---- set-up of a pass ----------------------------------------------------------------------------------
    def _set_layers(self, enabled: bool, active: str | None = None) -> None:
        for layer in self.layers:
            self._set_layer(layer, enabled, active)

    @staticmethod
    def _set_layer(layer: nn.Module, enabled: bool, active: str | None = None) -> None:
        if layer.disable_adapters == enabled:  # PEFT's property: True while the layer is disabled
            layer.enable_adapters(enabled)
        if active is not None and list(layer.active_adapters) != [active]:
            layer.set_adapter(active)

    def _plan_merged(self, adapter: str) -> None:
        merged_copies = {id(c[2]) for c in self._merged.values()}
        for layer in self.layers:
            if adapter not in layer.lora_A or not batchable(layer, adapter):
                self._set_layer(layer, enabled=True, active=adapter)
                continue
            self._set_layer(layer, enabled=False)  # the layer returns its base layer's output, on the merged weight
            base = layer.get_base_layer()
            if id(base.weight) in merged_copies:  # never merge onto a merged copy
                raise RuntimeError(f"LoRA router: {type(layer).__name__} still holds a merged weight")
            cached = self._merged.get(id(layer))
            if cached is None or cached[0] != adapter or cached[1] is not base.weight:
                with torch.no_grad():
                    delta = layer.get_delta_weight(adapter).float()
                    merged = (base.weight.float() + delta).to(base.weight.dtype)
                cached = (adapter, base.weight, nn.Parameter(merged, requires_grad=False))
                self._merged[id(layer)] = cached
            self._swapped.append((base, base.weight))
            base.weight = cached[2]
        self.merged_layers += len(self._swapped)

    def _plan_mixed(self, names: list[str]) -> None:
        adapters = sorted(set(names) - {BASE_ROUTE})
        for layer in self.layers:
            present = [a for a in adapters if a in layer.lora_A]
            if self.batched and all(batchable(layer, a) for a in present):
                self._set_layer(layer, enabled=False)  # the layer returns its base output; _post_hook adds LoRA
                if present:
                    self._stacks[id(layer)] = self._stack(layer, present, names)
            else:
                self._set_layer(layer, enabled=True)
                self._peft_routed.add(id(layer))

    @staticmethod
    def _stack(layer: nn.Module, adapters: list[str], names: list[str]) -> _Stack:
        weights = [(layer.lora_A[a].weight, layer.lora_B[a].weight) for a in adapters]  # [r, d_in], [d_out, r]
        r_max = max(a.shape[0] for a, _ in weights)
        a0, b0 = weights[0]
        a = a0.new_zeros((len(adapters) + 1, a0.shape[1], r_max))
        b = b0.new_zeros((len(adapters) + 1, r_max, b0.shape[0]))
        for k, (wa, wb) in enumerate(weights, start=1):
            a[k, :, : wa.shape[0]] = wa.T
            b[k, : wb.shape[1], :] = wb.T
        scale = torch.tensor([0.0] + [float(layer.scaling[n]) for n in adapters], dtype=torch.float32, device=a.device)
        return _Stack(a, b, scale, {n: k for k, n in enumerate(adapters, start=1)})

    # ---- hooks ---------------------------------------------------------------------------------------------
    def _names_for(self, batch: int) -> list[str]:
        names = self._route.get(batch)
        if names is None:
            raise RuntimeError(f"LoRA layer saw batch {batch}, routing covers {sorted(self._route)}")
        return names

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if id(module) not in self._peft_routed:
            return None
        x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
        kwargs["adapter_names"] = self._names_for(x.shape[0])
        self.calls["peft_routed"] += 1
        return args, kwargs

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        stack = self._stacks.get(id(module))
        if stack is None:
            return None
        x = args[0] if args else kwargs["x"]
        n = x.shape[0]
        if n not in stack.per_batch:  # once per pass and batch size: each sample's A and scale·B
            idx = torch.tensor([stack.rows.get(name, 0) for name in self._names_for(n)], device=stack.a.device)
            scaled_b = (stack.b[idx].float() * stack.scale[idx].view(n, 1, 1)).to(stack.b.dtype)
            stack.per_batch[n] = (stack.a[idx], scaled_b)
        a, b = stack.per_batch[n]
        x3 = x.reshape(n, -1, x.shape[-1])
        h = torch.bmm(x3 if x3.dtype == a.dtype else x3.to(a.dtype), a)  # [N, L, r]
        self.calls["batched"] += 1
        out3 = output.reshape(n, -1, output.shape[-1])
        if out3.dtype == b.dtype:  # base output + (x A)(scale B) in one fused op
            return torch.baddbmm(out3, h, b).reshape(output.shape)
        return (out3 + torch.bmm(h, b).to(out3.dtype)).reshape(output.shape)
