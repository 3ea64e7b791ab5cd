"""The plain-PyTorch LoRA training loop: no Ray, no MLflow; side effects come in as ``report``.

state = make_state(cfg, parts, steps_per_epoch)
train_loop(cfg, parts, source, state, report=lambda metrics, state: print(metrics))
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from training.config import OptimArgs, TrainConfig
from training.dataset import Batch, EncodedSource, PixelSource, epoch_batches
from training.model import Parts
from training.optim import build_optimizer, build_scheduler

Report = Callable[[dict[str, float], "TrainState"], None]


@dataclass
class TrainState:
    """What a checkpoint must hold besides the adapter to continue exactly where training stopped.

    ``scaler`` is fp16's loss scaler (``Precision.grad_scaler()``; a disabled pass-through for bf16/fp32): its
    scale and growth tracker are saved, so a resumed fp16 run continues with the scale it had reached instead of
    backing off from 2**16 again. ``skipped_steps`` counts optimizer steps the scaler skipped (inf/NaN gradients).
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    step: int = 0  # optimizer steps taken (skipped fp16 steps included: the run's length does not change)
    epoch: int = 0  # epochs completed
    noise_gen: torch.Generator = field(default_factory=torch.Generator)
    history: list[dict[str, float]] = field(default_factory=list)
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "total_steps": self.total_steps,
            "noise_gen": self.noise_gen.get_state(),
            "scaler": self.scaler.state_dict(),  # {} when disabled
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.noise_gen.set_state(state["noise_gen"])
        if self.scaler.is_enabled() and state.get("scaler"):  # absent in fp32/bf16 runs and older checkpoints
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps


def optimizer_steps(args: OptimArgs, micro_batches_per_epoch: int) -> int:
    """Total optimizer steps of the run: ``train.max_steps`` if set, else epochs × steps per epoch."""
    per_epoch = math.ceil(micro_batches_per_epoch / args.grad_accum)
    return args.max_steps or args.epochs * per_epoch


def make_state(cfg: TrainConfig, parts: Parts, micro_batches_per_epoch: int, rank: int = 0) -> TrainState:
    """Optimizer, LR schedule, fp16's loss scaler (``parts.precision``) and a noise generator seeded per rank
    (one worker is reproducible)."""
    total = optimizer_steps(cfg.train, micro_batches_per_epoch)
    opt = build_optimizer(parts.trainable, cfg.train, parts.device)
    sched = build_scheduler(opt, cfg.train, total)
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + rank)
    return TrainState(opt, sched, total, noise_gen=gen, scaler=parts.precision.grad_scaler())


def _latents(parts: Parts, batch: Batch, gen: torch.Generator) -> torch.Tensor:
    if batch.latent_mean is not None:
        mean, std = batch.latent_mean, batch.latent_std
    else:
        with torch.no_grad():
            dist_ = parts.vae.encode(batch.pixels.to(parts.device, parts.precision.vae_dtype)).latent_dist
        mean, std = dist_.mean.float().cpu(), dist_.std.float().cpu()
    sample = mean + std * torch.randn(mean.shape, generator=gen)
    return (sample * parts.vae.config.scaling_factor).to(parts.device)


def prediction_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict for ``scheduler.config.prediction_type``: the noise (``epsilon``) or the
    velocity α_t·ε − σ_t·x₀ (``v_prediction``, Salimans & Ho, 2022; ``scheduler.get_velocity``). Same shape as
    ``latents``.

    Raises:
        ValueError: another prediction type (e.g. ``sample``), naming the base model's scheduler config.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"the base model's scheduler predicts {kind!r} (scheduler/scheduler_config.json prediction_type); lorafleet "
        "trains epsilon and v_prediction models: use a base model with one of them"
    )


def denoising_loss(parts: Parts, batch: Batch, args: OptimArgs, gen: torch.Generator) -> torch.Tensor:
    """The denoising loss on one batch, min-SNR weighted; all randomness drawn from ``gen``.

    The target follows the scheduler config's ``prediction_type``: the noise (epsilon) or the velocity
    ``noise_scheduler.get_velocity`` (v-prediction: SD 2.x 768 px). Min-SNR-γ weights (Hang et al., 2023, §3.4) are
    min(SNR, γ)/SNR for epsilon and min(SNR, γ)/(SNR + 1) for v-prediction, as diffusers' ``train_text_to_image.py``.
    The UNet gets the family's conditioning: prompt embeds, and for SDXL ``added_cond_kwargs`` (pooled embeds and
    each sample's time ids).
    """
    latents = _latents(parts, batch, gen)
    b = len(batch)
    noise = torch.randn(latents.shape, generator=gen)
    if args.noise_offset:
        noise += args.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=gen)
    noise = noise.to(parts.device)
    timesteps = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (b,), generator=gen)
    timesteps = timesteps.to(parts.device)
    noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = parts.noise_scheduler.config.prediction_type
    target = prediction_target(parts.noise_scheduler, latents, noise, timesteps)
    with parts.autocast():  # fp32 latents and embeddings: autocast casts them per op
        cond = batch.cond.to(parts.device) if batch.cond is not None else parts.encode(batch.input_ids)
        extra = parts.family.added_cond_kwargs(cond, batch.time_ids)
        pred = parts.unet(noisy, timesteps, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=extra).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    snr_weights = None
    if args.snr_gamma is not None:
        snr = compute_snr(parts.noise_scheduler, timesteps)
        snr_weights = torch.clamp(snr, max=args.snr_gamma) / (snr if prediction == "epsilon" else snr + 1)
    return weighted_loss(per_sample, batch.prior, args.prior_loss_weight, snr_weights)


def weighted_loss(
    per_sample: torch.Tensor,
    prior: torch.Tensor | None,
    prior_loss_weight: float,
    snr_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch loss: mean over samples of ``loss_i × w_i × snr_i``.

    ``w_i`` is ``prior_loss_weight`` for a class image (``prior[i]``) and 1 for an instance image — kohya-ss
    sd-scripts' prior preservation (``train_util.BaseDataset.__getitem__`` sets ``loss_weights`` to
    ``prior_loss_weight if image_info.is_reg else 1.0``; ``train_network.py`` multiplies the per-sample loss by
    them before its ``.mean()``). It works with buckets and repeats because class images are ordinary samples.
    diffusers' ``train_dreambooth_lora.py`` instead pairs every instance image with a class image in a
    2·B batch and adds ``instance_loss + prior_loss_weight · prior_loss``: the same weighting, twice this value for
    half-and-half batches. With ``prior_loss_weight=0`` class images contribute exactly zero gradient.

    Args:
        per_sample: (B,) loss of each sample (MSE averaged over C, H, W).
        prior: (B,) bool, True for class images; None = no class image in the batch.
        prior_loss_weight: ``train.prior_loss_weight`` (≥ 0).
        snr_weights: (B,) min-SNR weights, or None for plain MSE.

    Returns:
        A scalar tensor.
    """
    if prior is not None:
        weights = torch.where(prior.to(per_sample.device), prior_loss_weight, 1.0).to(per_sample.dtype)
        per_sample = per_sample * weights
    if snr_weights is not None:
        per_sample = per_sample * snr_weights
    return per_sample.mean()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over all ranks (the values themselves without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    nccl = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    t = torch.tensor(values, dtype=torch.float64, device=torch.cuda.current_device() if nccl else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def _global_mean(value: float, count: int) -> float:
    """Mean over all DDP ranks (plain value without torch.distributed)."""
    total, n = all_reduce_sum([value * count, float(count)])
    return total / n if n else value


def _no_sync(models: list[torch.nn.Module], syncing: bool) -> contextlib.ExitStack:
    """Skip DDP's gradient all-reduce on accumulation micro-batches."""
    stack = contextlib.ExitStack()
    if not syncing:
        for m in models:
            if hasattr(m, "no_sync"):
                stack.enter_context(m.no_sync())
    return stack


def optimizer_step(state: TrainState, params: list[torch.nn.Parameter], max_grad_norm: float | None) -> bool:
    """One optimizer step through the loss scaler: unscale, clip, step, update, LR schedule; False when skipped.

    The order is PyTorch's AMP recipe ("Gradient clipping" in the AMP examples): ``unscale_`` before clipping so
    the norm is in true units, then ``scaler.step`` (which skips the update when a gradient is inf/NaN), then
    ``scaler.update`` (halves the scale after a skip, doubles it after ``growth_interval`` clean steps). A skipped
    step does not advance the LR schedule — as accelerate's ``AcceleratedScheduler`` does for diffusers' scripts —
    but counts in ``state.step``, so the run keeps its length. With a disabled scaler (bf16/fp32) this is
    clip + step + schedule.
    """
    scaler = state.scaler
    scaler.unscale_(state.optimizer)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    scaler.step(state.optimizer)
    scaler.update()
    skipped = scaler.is_enabled() and scaler.get_scale() < scale  # the scale backs off exactly when inf was found
    if not skipped:
        state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.skipped_steps += int(skipped)
    return not skipped


def _current_lr(state: TrainState) -> float:
    group = state.optimizer.param_groups[0]
    return float(group["lr"]) * float(group.get("d", 1.0))  # prodigy: effective lr = d · lr


def train_loop(
    cfg: TrainConfig,
    parts: Parts,
    source: PixelSource | EncodedSource,
    state: TrainState,
    *,
    report: Report,
    rank: int = 0,
    world_size: int = 1,
) -> TrainState:
    """Train from ``state`` (fresh or resumed) to the end; ``report(metrics, state)`` after every epoch.

    Metrics per epoch: epoch, step, loss (mean over ranks), lr, images_per_s, epoch_time_s; with fp16 loss
    scaling also grad_scale (the scaler's current scale) and skipped_steps (optimizer steps skipped so far for
    inf/NaN gradients).
    """
    args = cfg.train
    models = [parts.unet] + [parts.text_encoders[n] for n in parts.lora_text_encoders]
    for m in models:
        m.train()
    epochs = args.epochs if args.max_steps is None else math.inf
    epoch = state.epoch
    while epoch < epochs and not state.done:
        start, seen, loss_sum = time.perf_counter(), 0, 0.0
        n_batches = source.batches_per_epoch(args.batch_size)  # per bucket: the same count on every rank
        for i, batch in enumerate(epoch_batches(source, args.batch_size, args.seed, epoch, rank)):
            syncing = (i + 1) % args.grad_accum == 0 or i + 1 == n_batches
            with _no_sync(models, syncing):
                loss = denoising_loss(parts, batch, args, state.noise_gen)
                state.scaler.scale(loss / args.grad_accum).backward()
            loss_sum += loss.item() * len(batch)
            seen += len(batch)
            if syncing:
                optimizer_step(state, parts.trainable, args.max_grad_norm)
                if state.done:
                    break
        elapsed = time.perf_counter() - start
        epoch += 1
        state.epoch = epoch
        metrics = {
            "epoch": epoch,
            "step": state.step,
            "loss": _global_mean(loss_sum / max(seen, 1), seen),
            "lr": _current_lr(state),
            "images_per_s": seen * world_size / elapsed,
            "epoch_time_s": elapsed,
        }
        if state.scaler.is_enabled():
            metrics |= {"grad_scale": state.scaler.get_scale(), "skipped_steps": state.skipped_steps}
        state.history.append(metrics)
        report(metrics, state)
    for m in models:
        m.eval()
    return state
