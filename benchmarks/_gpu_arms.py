"""The arms of ``benchmarks/gpu_bench.py``: LoRA training through the project's loop, generation through its engine.

Training (``TrainGroup``, one per precision): the base model is loaded once through the worker's own path
(``training.worker.build_worker_parts``: ``load_parts`` + ``add_lora``); each arm runs ``training.loop.train_loop``
from a fresh ``make_state`` and the same initial LoRA weights, on one of two sources over the same images:

- ``cached``: ``training.dataset.make_source(use_cache=True)`` — latents and text embeddings encoded once;
- ``encode``: every step runs the VAE encoder and the text encoder, as diffusers' ``train_text_to_image_lora.py``
  does. The images are decoded once into memory (``DecodedPixelSource``), as that script's DataLoader workers take
  decoding off the training process's critical path, so the difference to ``cached`` is the encoders alone.

Serving (``ServeBench``): ``serving.engine.Engine`` built from ``ServeArgs`` (no Ray), called with a batch of one-image
requests; ``separate`` hands the same requests to ``generate`` as one call per adapter.
No Ray, no MLflow.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch
from _gpu_measure import PeakMemory, count_flops, now

from serving.config import ServeArgs
from serving.engine import Engine, ImageRequest
from training.config import TrainConfig
from training.data import Example, validate_dataset
from training.dataset import Batch, PixelSource, epoch_batches, load_image_and_crop, make_source
from training.loop import denoising_loss, make_state, train_loop
from training.model import Parts, enable_gradient_checkpointing
from training.worker import build_worker_parts

PROMPT = "a photo of sks"
SERVE_KINDS = ("base", "single", "mixed", "separate")


def train_config(
    model_dir: Path, data_dir: Path, precision: str, batch_size: int, epochs: int, resolution: int, rank: int
) -> TrainConfig:
    """The benchmark's TrainConfig: LoRA ``rank`` on the UNet's attention (to_q/k/v/out), AdamW, min-SNR, grad
    clipping — configs/train.yaml's recipe — at ``resolution`` px, ``train.mixed_precision=precision``."""
    return TrainConfig.model_validate(
        {
            "base_model": str(model_dir),
            "output_dir": str(data_dir.parent / "train-out"),
            "run_name": "gpu-bench",
            "data": {"path": str(data_dir), "trigger": "sks", "resolution": resolution},
            "lora": {"rank": rank},
            "train": {"epochs": epochs, "batch_size": batch_size, "mixed_precision": precision, "warmup_steps": 0},
            "mlflow": {"enabled": False},
        }
    )


class DecodedPixelSource(PixelSource):
    """``PixelSource`` (the loop encodes every step) over images decoded once into memory (center crops, no
    flips: the same pixels ``PixelSource`` would decode each step)."""

    def __init__(self, examples: list[Example], data, parts: Parts):
        super().__init__(examples, data, parts, cache_text=False)
        bg = data.background_rgb
        loaded = [
            load_image_and_crop(e.path, self.buckets[i], data.crop, background=bg) for i, e in enumerate(examples)
        ]
        self.pixels = [pixels for pixels, _ in loaded]
        # SDXL's size conditioning of each image (None for families without it), as PixelSource gives it
        self.crop_ids = torch.stack([crop.time_ids() for _, crop in loaded]) if self.uses_time_ids else None

    def batch(self, idx: list[int], gen: torch.Generator) -> Batch:
        prior = self.prior[idx] if bool(self.prior.any()) else None
        time_ids = self.crop_ids[idx] if self.crop_ids is not None else None
        return Batch(
            self.input_ids[idx], pixels=torch.stack([self.pixels[i] for i in idx]), prior=prior, time_ids=time_ids
        )


def set_checkpointing(parts: Parts, on: bool) -> None:
    """Gradient checkpointing of the UNet on or off (``train.gradient_checkpointing``)."""
    if on:
        enable_gradient_checkpointing(parts)
    else:
        parts.raw_unet.disable_gradient_checkpointing()


class TrainGroup:
    """One precision's parts and both sources; ``run`` measures one arm, ``flops`` counts one training step."""

    def __init__(self, model_dir: Path, data_dir: Path, precision: str, resolution: int, rank: int, device):
        self.model_dir, self.data_dir, self.precision = model_dir, data_dir, precision
        self.resolution, self.rank, self.device = resolution, rank, torch.device(device)
        cfg = self.config(batch_size=1, epochs=1)
        self.parts = build_worker_parts(cfg, self.device)
        examples = validate_dataset(cfg.data).examples
        self.sources = {
            "cached": make_source(examples, cfg.data, self.parts, use_cache=True),
            "encode": DecodedPixelSource(examples, cfg.data, self.parts),
        }
        self.initial_lora = [p.detach().clone() for p in self.parts.trainable]

    def config(self, batch_size: int, epochs: int) -> TrainConfig:
        return train_config(
            self.model_dir, self.data_dir, self.precision, batch_size, epochs, self.resolution, self.rank
        )

    def _reset(self, checkpointing: bool) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.parts.trainable, self.initial_lora):
                p.copy_(p0)
                p.grad = None
        set_checkpointing(self.parts, checkpointing)

    def run(self, source: str, batch_size: int, checkpointing: bool, timed_epochs: int) -> dict:
        """``1 + timed_epochs`` epochs of ``train_loop``; the first (warm-up) is not counted. Epoch times are read
        from synchronised clocks at each epoch's report, so they hold everything the loop does per epoch.

        Returns per timed epoch: ``epoch_s``, ``images_per_s``, ``steps_per_s``, ``loss``; and ``peak_memory_bytes``.
        """
        src = self.sources[source]
        cfg = self.config(batch_size, 1 + timed_epochs)
        self._reset(checkpointing)
        state = make_state(cfg, self.parts, src.batches_per_epoch(batch_size))
        stamps: list[tuple[float, float]] = []
        with PeakMemory(self.device) as memory:
            start = now(self.device)
            train_loop(cfg, self.parts, src, state, report=lambda m, st: stamps.append((now(self.device), m["loss"])))
        times = [start] + [t for t, _ in stamps]
        epoch_s = [b - a for a, b in zip(times, times[1:])][1:]
        steps, images = src.batches_per_epoch(batch_size), len(src)
        return {
            "epoch_s": epoch_s,
            "images_per_s": [images / s for s in epoch_s],
            "steps_per_s": [steps / s for s in epoch_s],
            "loss": [loss for _, loss in stamps[1:]],
            "peak_memory_bytes": memory.peak,
        }

    def flops(self, source: str, batch_size: int) -> int:
        """FLOPs of one training step (``denoising_loss`` + backward, without checkpointing: model FLOPs, not the
        recomputation) on ``source`` at ``batch_size``, the encoders included for ``encode``. Counted, not
        estimated: with the base frozen, backward computes input gradients only (about one more forward), not the
        weight gradients of full fine-tuning (the 6·N·tokens rule does not apply)."""
        cfg = self.config(batch_size, 1)
        self._reset(checkpointing=False)
        batch = next(epoch_batches(self.sources[source], batch_size, cfg.train.seed, 0))
        gen = torch.Generator().manual_seed(cfg.train.seed)
        self.parts.unet.train()
        try:
            return count_flops(lambda: denoising_loss(self.parts, batch, cfg.train, gen).backward())
        finally:
            self.parts.unet.eval()
            self._reset(checkpointing=False)

    def close(self) -> None:
        """Drop the model and caches (the serving arms need the memory)."""
        del self.parts, self.sources, self.initial_lora
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def serve_args(
    model_dir: Path, adapters: dict[str, Path], cache: Path, resolution: int, steps: int, guidance: float, **kw
) -> ServeArgs:
    """ServeArgs for the engine: base model + ``adapters``, 512² (``resolution``) images, ``steps`` denoising steps
    at ``guidance``; ``kw``: ``max_batch`` (largest batch), ``dtype`` (ServeArgs.dtype)."""
    max_batch = kw.get("max_batch", 16)
    return ServeArgs.model_validate(
        {
            "base_model": str(model_dir),
            "dtype": kw.get("dtype", "auto"),
            "adapters": {name: str(path) for name, path in adapters.items()},
            "adapter_roots": sorted({str(p.parent) for p in adapters.values()}),
            "champion": {"model": None},
            "default_model": "base",
            "adapter_cache_dir": str(cache),
            "max_adapters": max(4, len(adapters)),
            "defaults": {"steps": steps, "guidance": guidance, "size": resolution},
            "limits": {
                "max_n": 1,
                "min_size": min(64, resolution),
                "max_size": resolution,
                "max_steps": max(50, steps),
            },
            "batching": {"max_batch_size": max_batch},
            "deployment": {"max_ongoing_requests": 4 * max_batch},
            "api_key_env": "LORAFLEET_GPU_BENCH_UNSET",
            "warmup": False,
        }
    )


class ServeBench:
    """Times ``Engine.generate`` on batches of one-image requests of the four kinds in ``SERVE_KINDS``."""

    def __init__(self, engine: Engine, adapters: list[str]):
        self.engine, self.adapters, self.seed = engine, adapters, 0

    def models(self, kind: str, batch: int) -> list[str]:
        """The model of each request: base; one adapter; the adapters round-robin (mixed and separate)."""
        if kind == "base":
            return ["base"] * batch
        if kind == "single":
            return [self.adapters[0]] * batch
        return [self.adapters[i % len(self.adapters)] for i in range(batch)]

    def call(self, kind: str, batch: int, steps: int | None = None) -> float:
        """Seconds for ``batch`` requests of ``kind`` from ``generate`` to its return (prompt checks and adapter
        resolution before the clock). ``separate``: one ``generate`` per adapter, back to back.

        Raises:
            RuntimeError: a request failed (the engine returns exceptions in place of results).
        """
        models = self.models(kind, batch)
        reqs = [
            self.engine.prepare(ImageRequest(PROMPT, model=m, seed=self.seed + i, steps=steps))
            for i, m in enumerate(models)
        ]
        self.seed += batch
        calls = [[r for r, m in zip(reqs, models) if m == a] for a in self.adapters] if kind == "separate" else [reqs]
        start = time.perf_counter()
        for group in calls:
            for result in self.engine.generate(group):  # PIL images: the device work is done when this returns
                if isinstance(result, Exception):
                    raise RuntimeError(f"{kind} batch {batch}: a request failed: {result}") from result
        return time.perf_counter() - start
