"""The generation engine: one base pipeline, many LoRA adapters, mixed-adapter batches. No Ray in here.

    engine = Engine.from_args(load_serve_args("configs/serve.yaml"))
    [result] = engine.generate([engine.prepare(ImageRequest("a red circle on a sks background", model="champion"))])
    result.images[0].save("out.png")

One batch may hold requests for different adapters and for the bare base model. Each pass takes the cheapest exact
path for its mix (``serving.lora_batch.LoraRouter``): adapters disabled for a base-only pass, the adapter active for
a single-adapter pass, and per-sample routing only for a truly mixed pass — there each sample's LoRA A/B are
gathered once per pass and applied with batched matmuls (``speed.lora_batching``). Requests that cannot share a
pass (different size, steps or guidance) run as sub-batches. ``speed`` also holds the diffusers speed options
(SDPA, channels-last, VAE slicing/tiling, TF32, ``torch.compile`` with LoRA hot-swap): ``serving.speed``.

One engine serves one base model of any family (``training.families``: SD 1.x/2.x, SDXL): the routing covers the
UNet and every text encoder the family has (SDXL: ``text_encoder`` and ``text_encoder_2``), and image sides are
multiples of what the model's UNet and VAE need (``size_multiple``), bounded by ``limits.min_size/max_size``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from serving.adapters import AdapterResolver, ResolvedAdapter
from serving.config import ServeArgs, project_path
from serving.image_request import Cancelled, ImageRequest, RequestError  # noqa: F401 - re-exported
from serving.loaded import LoadedAdapters
from serving.lora_batch import BASE_ROUTE, LoraRouter
from serving.speed import apply_speed
from training.adapter import AdapterError
from training.families import family_for

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A validated request with every default filled in and its adapter resolved (None: base)."""

    request: ImageRequest
    model: str
    adapter: ResolvedAdapter | None
    seed: int
    steps: int
    guidance: float
    width: int
    height: int

    @property
    def shape_key(self) -> tuple:
        return self.width, self.height, self.steps, self.guidance


@dataclass
class ImageResult:
    images: list[Image.Image]
    seeds: list[int]
    model: str
    version: str | None  # registry version of the adapter, if any
    batch_images: int  # images in the UNet pass this request shared
    seconds: float  # wall time of that pass
    pass_id: int = 0  # which pass of this engine drew it


class Engine:
    """Thread-safe: one generation at a time (a pass already uses every core/GPU it has).

    Raises (at construction):
        ValueError: ``defaults.size`` is outside ``limits.min_size..max_size`` or not a multiple of the model's
            ``size_multiple`` (every request without a size would be refused).
    """

    def __init__(self, pipe, args: ServeArgs, resolver: AdapterResolver):
        self.pipe = pipe
        self.args = args
        self.resolver = resolver
        self.family = family_for(pipe)
        speed = args.speed
        self.lora = LoraRouter(
            list(self.family.lora_modules(pipe).values()),  # the UNet and every text encoder (SDXL: two)
            batched=speed.lora_batching == "batched",
            merge_single=speed.merge_single_adapter and not speed.compile_unet,
        )
        self.adapters = LoadedAdapters(
            pipe,
            args.max_adapters,
            on_change=self.lora.refresh,
            hotswap=args.speed.compile_unet,
            hotswap_max_rank=args.speed.hotswap_max_rank,
        )
        # latents are 1/vae_scale_factor of the image, and the UNet halves them at each of its levels but the last
        self.size_multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        # SDXL (force_zeros_for_empty_prompt): with no negative prompt in a pass its negative embeddings are zeros,
        # with one they are every row's encoded text, "" included; so passes never mix rows with and without one,
        # and each image stays what it is alone
        self.zeros_for_empty_negative = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
        self._check_default_size()
        self._lock = threading.Lock()
        self.passes = 0
        self._steps_ok: dict[int, bool] = {}

    def _check_default_size(self) -> None:
        lim, size, m = self.args.limits, self.args.defaults.size, self.size_multiple
        if not lim.min_size <= size <= lim.max_size or size % m:
            raise ValueError(
                f"defaults.size {size} px: this base model ({self.family.name}) draws sides that are multiples of {m} "
                f"px, and limits allow {lim.min_size}..{lim.max_size}; set defaults.size to such a multiple in range "
                f"(e.g. {self.family.default_resolution} for released {self.family.name} models)"
            )

    @classmethod
    def from_args(cls, args: ServeArgs, cache_dir: Path | None = None) -> Engine:
        """Load the base pipeline (device/dtype from ``args``, CPU fallback) and set up the adapter resolver."""
        from training.families import load_pipeline

        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device: cuda, but torch sees no CUDA GPU; set device: auto or cpu")
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        if device == "cpu" and dtype == torch.float16:
            raise RuntimeError("dtype: float16 needs a CUDA GPU; use auto or float32 on CPU")
        base = project_path(args.base_model)
        vae = project_path(args.vae) if args.vae else None
        pipe = load_pipeline(base, device=device, dtype=dtype, vae=vae)
        apply_speed(pipe, args.speed)
        cache = cache_dir or Path(project_path(args.adapter_cache_dir))
        return cls(pipe, args, AdapterResolver(args, base, cache))

    # ---- requests -------------------------------------------------------------------------------------------
    def prepare(self, req: ImageRequest, wait_s: float | None = None) -> Prepared:
        """Fill defaults, check limits, resolve the adapter (may fetch it from the registry, waiting at most
        ``wait_s``: ``AdapterResolver.resolve``).

        Raises:
            RequestError: a field outside the configured limits.
            serving.adapters.UnknownModel (also another tenant's adapter) / AdapterUnavailable,
            training.adapter.AdapterError.
        """
        lim, d = self.args.limits, self.args.defaults
        if not req.prompt or not req.prompt.strip():
            raise RequestError("prompt", "is empty; describe the image to generate")
        if len(req.prompt) > lim.max_prompt_chars:
            raise RequestError("prompt", f"{len(req.prompt)} characters > limit {lim.max_prompt_chars}")
        if len(req.negative_prompt) > lim.max_prompt_chars:
            raise RequestError("negative_prompt", f"longer than {lim.max_prompt_chars} characters")
        if not 1 <= req.n <= lim.max_n:
            raise RequestError("n", f"{req.n} is outside 1..{lim.max_n}")
        steps = d.steps if req.steps is None else req.steps
        if not 1 <= steps <= lim.max_steps:
            raise RequestError("steps", f"{steps} is outside 1..{lim.max_steps}")
        if not self._scheduler_takes(steps):
            raise RequestError("steps", f"{steps} is more than this model's scheduler can space out; use fewer")
        guidance = d.guidance if req.guidance is None else float(req.guidance)
        if not 0 <= guidance <= lim.max_guidance:  # also refuses NaN
            raise RequestError("guidance", f"{guidance} is outside 0..{lim.max_guidance}")
        width = d.size if req.width is None else req.width  # 0 is a size to refuse, not 'the default'
        height = d.size if req.height is None else req.height
        for name, side in (("width", width), ("height", height)):
            if not lim.min_size <= side <= lim.max_size or side % self.size_multiple:
                raise RequestError(
                    name, f"{side} px: use a multiple of {self.size_multiple} in {lim.min_size}..{lim.max_size}"
                )
        seed = secrets.randbelow(2**31) if req.seed is None else req.seed
        if not 0 <= seed < 2**63 - lim.max_n:  # image i uses seed + i, a torch.Generator seed below 2^63
            raise RequestError(
                "seed",
                f"{seed} is outside 0..{2**63 - lim.max_n - 1}: image i uses seed + i, which stays below 2^63 "
                f"for every n up to limits.max_n ({lim.max_n})",
            )
        model = req.model or self.args.default_model
        adapter = self.resolver.resolve(model, req.tenant, wait_s)
        return Prepared(req, model, adapter, seed, steps, guidance, width, height)

    def _scheduler_takes(self, steps: int) -> bool:
        """Whether the scheduler's timesteps for ``steps`` stay inside its training range (DDIM with 1000
        training steps fails on 1000 inference steps: its offset reaches timestep 1000)."""
        if steps not in self._steps_ok:
            scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
            try:
                scheduler.set_timesteps(steps)
                ok = int(scheduler.timesteps.max()) < scheduler.config.num_train_timesteps
            except ValueError:
                ok = False
            self._steps_ok[steps] = ok
        return self._steps_ok[steps]

    def generate(
        self, batch: Sequence[Prepared], should_stop: Callable[[], bool] | None = None
    ) -> list[ImageResult | Exception]:
        """One result per request, in order; a request that failed gets its exception instead.

        Raises:
            Cancelled: ``should_stop()`` turned true (checked after every denoising step).
        """
        results: list[ImageResult | Exception | None] = [None] * len(batch)
        for group in self.plan(batch):
            try:
                outs = self._run([batch[i] for i in group], should_stop)
            except Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - one failed pass must not fail the other groups
                log.exception("generation failed for %d requests", len(group))
                outs = [exc] * len(group)
            for i, out in zip(group, outs):
                results[i] = out
        return results  # type: ignore[return-value]

    def plan(self, batch: Sequence[Prepared]) -> list[list[int]]:
        """Indices of ``batch`` split into passes: same size/steps/guidance (and, on SDXL, all or none with a
        negative prompt: ``zeros_for_empty_negative``), at most ``max_adapters`` adapters per pass, and one adapter
        per pass when mixed batches are off."""
        mixed = self.args.batching.mixed_adapters
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(batch):
            key = (*p.shape_key, self.zeros_for_empty_negative and bool(p.request.negative_prompt))
            key = key if mixed else (*key, p.adapter.key if p.adapter else None)
            groups.setdefault(key, []).append(i)
        passes: list[list[int]] = []
        for idx in groups.values():
            current: list[int] = []
            keys: set[str] = set()
            for i in idx:
                k = batch[i].adapter.key if batch[i].adapter else None
                if k is not None and k not in keys and len(keys) == self.args.max_adapters:
                    passes.append(current)
                    current, keys = [], set()
                current.append(i)
                if k is not None:
                    keys.add(k)
            passes.append(current)
        return passes

    def _run(self, group: list[Prepared], should_stop: Callable[[], bool] | None) -> list[ImageResult | Exception]:
        """One UNet pass for ``group``; requests whose adapter fails to load get its ``AdapterError`` instead,
        and the others still run."""

        def refused(p: Prepared) -> AdapterError | None:
            slot = slots.get(p.adapter.key) if p.adapter else None
            return slot if isinstance(slot, AdapterError) else None

        with self._lock:
            slots = self.adapters.ensure([p.adapter for p in group if p.adapter])
            ok = [p for p in group if refused(p) is None]
            drawn = iter(self._draw(ok, slots, should_stop) if ok else [])
        return [refused(p) or next(drawn) for p in group]

    @torch.no_grad()
    def _draw(self, group: list[Prepared], slots: dict, should_stop: Callable[[], bool] | None) -> list[ImageResult]:
        prompts, negatives, gens, route = [], [], [], []
        for p in group:
            for i in range(p.request.n):
                prompts.append(p.request.prompt)
                negatives.append(p.request.negative_prompt)
                gens.append(torch.Generator("cpu").manual_seed(p.seed + i))
                route.append(slots[p.adapter.key] if p.adapter else BASE_ROUTE)
        first = group[0]

        def on_step(pipe, step, timestep, kwargs):
            if should_stop is not None and should_stop():
                raise Cancelled(f"stopped at step {step + 1}/{first.steps}: every client went away")
            return kwargs

        start = time.perf_counter()
        with self.lora.route(route):
            out = self.pipe(
                prompts,
                negative_prompt=negatives if any(negatives) else None,
                width=first.width,
                height=first.height,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance,
                generator=gens,
                callback_on_step_end=on_step,
            )
        seconds = time.perf_counter() - start
        self.passes += 1
        pass_id = self.passes
        results, at = [], 0
        for p in group:
            n = p.request.n
            version = p.adapter.version if p.adapter else None
            seeds = [p.seed + i for i in range(n)]
            results.append(
                ImageResult(out.images[at : at + n], seeds, p.model, version, len(prompts), seconds, pass_id)
            )
            at += n
        return results

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def warm_up(self) -> float:
        """One small generation with the default model (base if it cannot be fetched); returns seconds."""
        start = time.perf_counter()
        try:
            req = self.prepare(ImageRequest("warm-up", steps=2, seed=0))
        except Exception as exc:  # noqa: BLE001 - the replica still serves base and the other adapters
            log.warning("warm-up with %s failed (%s); warming up the base model", self.args.default_model, exc)
            req = self.prepare(ImageRequest("warm-up", model="base", steps=2, seed=0))
        self.generate([req])
        return time.perf_counter() - start

    def preload(self, names: list[str]) -> None:
        """Resolve ``names`` and load their adapters now, so the first request after a champion move is fast."""
        adapters = [a for a in (self.resolver.resolve(n, wait_s=0) for n in names) if a is not None]
        with self._lock:
            self.adapters.ensure(adapters[: self.args.max_adapters])

    def stats(self) -> dict:
        a = self.adapters
        return {"loaded": len(a), "hits": a.hits, "misses": a.misses, "evictions": a.evictions}
