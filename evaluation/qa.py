"""The QA suite: render the fixed prompts with the base model and an adapter, then score both.

No MLflow, no Ray: a pipeline, a scorer and a config in, images and numbers out. Any family's pipeline (SD 1.x/2.x,
SDXL: ``training.families.load_pipeline``) renders the suite through its own ``__call__``; images are square, of
``generation.resolution`` px (null: the pipeline's default, ``unet.config.sample_size × vae_scale_factor``).

    pipe = load_pipeline("models/toy-sd")
    base = render_suite(pipe, cfg, adapter=None)
    load_adapter(pipe, "runs/train/adapter", adapter_name="candidate")
    cand = render_suite(pipe, cfg, adapter="candidate", timed=True)
    scores = score(scorer, cfg.suite, cand, base, references)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from PIL import Image

from evaluation.config import DataArgs, EvalConfig, SuiteArgs
from evaluation.metrics import (
    ClipScorer,
    clip_i,
    clip_t,
    concept_gain,
    finite_image,
    hit_rate,
    paired_similarity,
    percentile,
    win_rate,
)


@dataclass
class Rendered:
    """One image per (prompt, seed); ``images[i]`` is None when that generation failed."""

    prompts: list[str]
    seeds: list[int]
    images: list[Image.Image | None]
    errors: list[str | None]
    latencies: list[float] = field(default_factory=list)  # seconds per image, when timed

    @property
    def ok(self) -> list[int]:
        return [i for i, img in enumerate(self.images) if img is not None]


@dataclass
class SuiteImages:
    trigger: Rendered  # suite.prompts x images_per_prompt
    prior: Rendered  # suite.prior_prompts x images_per_prompt


def _call(pipe: DiffusionPipeline, prompts: list[str], seeds: list[int], cfg: EvalConfig) -> np.ndarray:
    g = cfg.generation
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    size = {"height": g.resolution, "width": g.resolution} if g.resolution else {}
    out = pipe(
        prompts, num_inference_steps=g.steps, guidance_scale=g.guidance, generator=gens, output_type="np", **size
    )
    return out.images


def render(pipe: DiffusionPipeline, prompts: list[str], cfg: EvalConfig, *, timed: bool = False) -> Rendered:
    """Every prompt ``images_per_prompt`` times (image j: ``generation.seed + j``), ``batch_size`` per call.

    A call that raises or returns non-finite pixels counts as failed for each of its images; the rest go on.
    """
    n = cfg.suite.images_per_prompt
    flat = [(p, cfg.generation.seed + j) for p in prompts for j in range(n)]
    out = Rendered([p for p, _ in flat], [s for _, s in flat], [], [])
    bs = cfg.generation.batch_size
    for start in range(0, len(flat), bs):
        chunk = flat[start : start + bs]
        t0 = time.perf_counter()
        try:
            arrays = _call(pipe, [p for p, _ in chunk], [s for _, s in chunk], cfg)
            error = None
        except Exception as exc:  # noqa: BLE001 — a failed generation is a measured outcome, not a crash
            arrays, error = None, f"{type(exc).__name__}: {exc}"[:300]
        elapsed = (time.perf_counter() - t0) / len(chunk)
        for k in range(len(chunk)):
            if arrays is not None and not finite_image(arrays[k]):
                out.images.append(None)
                out.errors.append("non-finite pixels (NaN/inf in the output)")
            elif arrays is not None:
                out.images.append(pipe.numpy_to_pil(arrays[k : k + 1])[0])
                out.errors.append(None)
            else:
                out.images.append(None)
                out.errors.append(error)
            if timed:
                out.latencies.append(elapsed)
    return out


def render_suite(pipe: DiffusionPipeline, cfg: EvalConfig, adapter: str | None, *, timed: bool = False):
    """The suite's trigger and prior prompts with ``adapter`` active (None = the base model).

    ``timed``: one untimed warm-up call first, then every call's wall time is recorded per image.
    """
    if adapter is None:
        if _has_lora(pipe):
            pipe.disable_lora()
    else:
        pipe.enable_lora()
        pipe.set_adapters(adapter)
    if timed:
        _call(pipe, [cfg.suite.prompts[0].prompt], [cfg.generation.seed], cfg)
    trigger = render(pipe, [p.prompt for p in cfg.suite.prompts], cfg, timed=timed)
    prior = render(pipe, cfg.suite.prior_prompts, cfg)
    return SuiteImages(trigger, prior)


def _has_lora(pipe: DiffusionPipeline) -> bool:
    return bool(getattr(pipe.unet, "peft_config", None))


def _images(r: Rendered, idx: list[int]) -> list[Image.Image]:
    return [r.images[i] for i in idx]


def score(
    scorer: ClipScorer,
    suite: SuiteArgs,
    images: SuiteImages,
    base: SuiteImages | None = None,
    references: torch.Tensor | None = None,
) -> dict[str, float]:
    """Every metric of ``images`` that the inputs allow (see ``evaluation.config.METRICS``); NaN where nothing
    could be measured.

    ``base``: the base model's images of the same suite and seeds, for the relative metrics
    (``concept_learned``, ``concept_gain``, ``concept_win_rate``, ``prior_similarity``). ``references``: CLIP
    embeddings of the training images, for ``clip_i``, ``concept_gain`` and ``concept_win_rate``. Without
    ``suite.concept`` there is no ``clip_t``, ``concept_learned`` or ``concept_hit_rate``; with fewer than two
    distinct contents ``flexibility_hit_rate`` is NaN (one option is always right).
    """
    trig = images.trigger
    n = suite.images_per_prompt
    ok = trig.ok
    m: dict[str, float] = {"success_rate": len(ok) / len(trig.images)}
    if trig.latencies:
        m["latency_p50_s"] = percentile(trig.latencies, 50)
        m["latency_p95_s"] = percentile(trig.latencies, 95)
    if not ok:
        return (
            m
            | {"flexibility": math.nan, "flexibility_hit_rate": math.nan}
            | ({"clip_t": math.nan} if suite.concept is not None else {})
        )
    img = scorer.images(_images(trig, ok))
    contents = [suite.prompts[i // n].content for i in ok]
    m["flexibility"] = clip_t(img, scorer.texts(contents))
    m["flexibility_hit_rate"] = _flexibility_hit_rate(scorer, suite, img, contents)
    if suite.concept is not None:
        m["clip_t"] = clip_t(img, scorer.texts([suite.spelled_out(trig.prompts[i]) for i in ok]))
    if suite.concept is not None and suite.alternatives:
        words = [suite.concept, *suite.alternatives]  # the concept is option 0 for every image
        texts = [suite.spelled_out(trig.prompts[i], w) for i in ok for w in words]
        per_image = scorer.texts(texts).view(len(ok), len(words), -1)
        m["concept_hit_rate"] = hit_rate(img, per_image, [0] * len(ok))
    if references is not None and len(references):
        m["clip_i"] = clip_i(img, references)
    if base is not None:
        m |= _relative(scorer, suite, img, ok, images, base, references)
    return m


def _flexibility_hit_rate(scorer: ClipScorer, suite: SuiteArgs, img: torch.Tensor, contents: list[str]) -> float:
    options = sorted({p.content for p in suite.prompts})
    if len(options) < 2:
        return math.nan
    return hit_rate(img, scorer.texts(options), [options.index(c) for c in contents])


def _relative(scorer, suite, img, ok, images: SuiteImages, base: SuiteImages, references) -> dict[str, float]:
    """The metrics against the base model's images of the same (prompt, seed) pairs (both generated)."""
    m = {}
    base_ok = [i for i in ok if base.trigger.images[i] is not None]
    if base_ok:
        b_img = scorer.images(_images(base.trigger, base_ok))
        a_img = img[[ok.index(i) for i in base_ok]]
        if suite.concept is not None:
            b_txt = scorer.texts([suite.spelled_out(base.trigger.prompts[i]) for i in base_ok])
            m["concept_learned"] = clip_t(a_img, b_txt) - clip_t(b_img, b_txt)
        if references is not None and len(references):
            m["concept_gain"] = concept_gain(a_img, b_img, references)
            m["concept_win_rate"] = win_rate(a_img, b_img, references)
    pairs = [i for i in images.prior.ok if base.prior.images[i] is not None]
    if pairs:
        a = scorer.images(_images(images.prior, pairs))
        b = scorer.images(_images(base.prior, pairs))
        m["prior_similarity"] = float(paired_similarity(a, b).mean())
    return m


def reference_embeddings(scorer: ClipScorer, data: DataArgs, trigger: str) -> torch.Tensor | None:
    """CLIP embeddings of (at most ``max_references``) training images, or None without ``train_path``."""
    if not data.train_path:
        return None
    from evaluation.suite import dataset_split

    examples = dataset_split(data, trigger)[0][: data.max_references]
    from training.images import open_rgb, parse_colour

    background = parse_colour(data.background)  # as training decodes them (data.background, handed over)
    return scorer.images([open_rgb(e.path, background).image for e in examples])


def heldout_set(pipe: DiffusionPipeline, data: DataArgs, trigger: str, resolution: int):
    """The held-out images encoded once, with their fixed noise and timesteps: ``(held, parts)``, then
    ``held.loss(parts)`` scores the pipeline as it stands (adapter active or not) — the same problems as
    training's ``val_loss``, so the numbers compare with a trial's. None without held-out images
    (``data.heldout_path`` or ``data.holdout``)."""
    if not (data.heldout_path or data.holdout):
        return None
    from evaluation.suite import dataset_split
    from training.config import DataConfig, TrainConfig, ValidationArgs
    from training.heldout import HeldOut
    from training.model import Parts
    from training.precision import inference_precision

    examples = dataset_split(data, trigger)[1]
    parts = Parts(
        pipe,
        pipe.unet,
        pipe.text_encoder,
        DDPMScheduler.from_config(pipe.scheduler.config),
        pipe.device,
        precision=inference_precision(pipe.unet.dtype, pipe.vae.dtype, pipe.device),
        trains_text_encoder=True,  # captions re-encoded per call: an adapter may carry a text-encoder LoRA
    )
    cfg = TrainConfig(
        base_model="unused",
        data=DataConfig(path=data.heldout_path or data.train_path, resolution=resolution, trigger=trigger),
        validation=ValidationArgs(seed=data.loss_seed, loss_timesteps=data.loss_timesteps),
    )
    vae, dtype = pipe.vae, pipe.vae.dtype
    # encode in fp32 where training would (training.precision): a half-precision VAE whose config says
    # force_upcast (SDXL's overflows in fp16) gives NaN latents, a NaN held-out loss and a refused gate
    family = parts.family
    upcast = vae.config.get("force_upcast", True) and (
        dtype == torch.float16 or (dtype == torch.bfloat16 and family.vae_fp32_in_bf16)
    )
    if upcast:
        vae.to(torch.float32)
    try:
        held = HeldOut(examples, cfg, parts)
    finally:
        if upcast:
            vae.to(dtype)
    return held, parts
