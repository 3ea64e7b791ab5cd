"""The held-out denoising loss: a validation metric with every random draw fixed in advance.

Training loss moves with each step's fresh noise and timesteps; this one does not. Each held-out
image gets ``validation.loss_timesteps`` noise levels spread evenly over the schedule and one noise
tensor per level, drawn once from ``validation.seed`` — so two adapters (two epochs, two trials)
are scored on exactly the same problems and their ``val_loss`` values compare directly.

held = HeldOut(examples, cfg, parts)
held.loss(parts)   # plain MSE to the epsilon / v target, no min-SNR weighting, LoRA dropout off

The images are bucketed as in training (``data.buckets``): each bucket's noise is drawn for all of its
images in a fixed bucket order, so the problems are the same for any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.buckets import assign_buckets, bucket_groups, histogram, worker_step
from training.config import PreflightError, TrainConfig
from training.data import Example, validate_dataset
from training.dataset import encode_pixels, encode_text, load_image_and_crop, tokenize
from training.families import Conditioning
from training.loop import all_reduce_sum, prediction_target
from training.model import Parts


def split_holdout(examples: list[Example], n: int) -> tuple[list[Example], list[Example]]:
    """Take ``n`` images, evenly spaced over the sorted list of the concept's images, out of training:
    (train, held out). Class images (``Example.prior``) are never held out: they stay in training."""
    if n <= 0:
        return examples, []
    concept = [i for i, e in enumerate(examples) if not e.prior]
    if n >= len(concept):
        raise PreflightError(
            f"validation.holdout={n} would leave no training images (the dataset has {len(concept)}); lower it"
        )
    picked = {concept[round(i * len(concept) / n)] for i in range(n)}
    train = [e for i, e in enumerate(examples) if i not in picked]
    return train, [e for i, e in enumerate(examples) if i in picked]


def select_heldout(cfg: TrainConfig, examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples for ``cfg.validation``: a separate folder, a holdout split, or none.

    Raises:
        DatasetError: the held-out folder has problems (nothing has been written).
        PreflightError: ``validation.holdout`` leaves no training images.
    """
    v = cfg.validation
    if v.data_path:
        update = {"path": v.data_path, "min_images": 1, "max_images": None, "class_data_dir": None}
        folder = cfg.data.model_copy(update=update)  # class images train; they are never held out
        report = validate_dataset(folder)
        report.raise_if_errors()
        return examples, report.examples
    return split_holdout(examples, v.holdout)


def fixed_timesteps(num_train_timesteps: int, k: int) -> torch.Tensor:
    """``k`` timesteps at the centres of ``k`` equal slices of [0, T): every noise level is represented."""
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * num_train_timesteps / k).long()


@dataclass
class _Chunk:
    """One bucket's problems on this rank: k rows per image (one per fixed timestep)."""

    latents: torch.Tensor  # (m·k, C, h, w), scaled posterior means
    noise: torch.Tensor  # (m·k, C, h, w)
    timesteps: torch.Tensor  # (m·k,)
    input_ids: torch.Tensor  # (m·k, E, L)
    cond: Conditioning | None  # (m·k, L, D) (+ pooled (m·k, P)); None when a text encoder trains (re-encoded per call)
    time_ids: torch.Tensor | None  # (m·k, 6) SDXL size conditioning of the center crop; None for SD


class HeldOut:
    """This rank's slice of the held-out set, encoded once (the VAE posterior mean, not a sample).

    Images go through training's bucketing (``data.buckets``); each bucket is scored as its own chunk.
    """

    def __init__(self, examples: list[Example], cfg: TrainConfig, parts: Parts, rank: int = 0, world_size: int = 1):
        v, data = cfg.validation, cfg.data
        k = v.loss_timesteps
        self.count = len(examples) * k  # over all ranks, before slicing
        t = fixed_timesteps(parts.noise_scheduler.config.num_train_timesteps, k)
        # drawn for the whole set, bucket by bucket, then sliced: the problems do not depend on the number of workers
        gen = torch.Generator().manual_seed(v.seed)
        assigned = assign_buckets([e.path for e in examples], data, worker_step(data, parts.pipe))
        self.buckets = histogram(assigned)
        self.chunks: list[_Chunk] = []
        self.size = 0
        vae = parts.vae.config
        factor = 2 ** (len(vae.block_out_channels) - 1)
        for (width, height), members in bucket_groups(assigned).items():
            mine = [j for j, i in enumerate(members) if i % world_size == rank]
            if not mine:  # still drawn: later buckets' noise must not depend on this rank's share
                torch.randn((len(members), k, vae.latent_channels, height // factor, width // factor), generator=gen)
                continue
            picked = [examples[members[j]] for j in mine]
            bg = data.background_rgb
            loaded = [load_image_and_crop(e.path, (width, height), "center", background=bg) for e in picked]
            mean, _ = encode_pixels(parts, torch.stack([p for p, _ in loaded]))
            time_ids = None
            if parts.family.uses_time_ids:
                time_ids = torch.stack([c.time_ids() for _, c in loaded]).repeat_interleave(k, dim=0)
            latents = (mean * vae.scaling_factor).cpu()
            noise = torch.randn((len(members), k, *latents.shape[1:]), generator=gen)[mine]  # (n, k, C, h, w)
            ids = tokenize(parts, [e.caption for e in picked])
            cond = None if parts.trains_text_encoder else encode_text(parts, ids).to("cpu").repeat_interleave(k)
            self.chunks.append(
                _Chunk(
                    latents.repeat_interleave(k, dim=0),
                    noise.flatten(0, 1),
                    t.repeat(len(mine)),
                    ids.repeat_interleave(k, dim=0),
                    cond,
                    time_ids,
                )
            )
            self.size += len(mine) * k

    @torch.no_grad()
    def loss(self, parts: Parts, batch_size: int = 32) -> float:
        """Mean squared error over the whole held-out set (all ranks when torch.distributed is up)."""
        total = 0.0
        if self.size:
            modules = [parts.raw_unet, *parts.raw_text_encoders.values()]  # no DDP: ranks run different batch counts
            modes = [m.training for m in modules]
            for m in modules:
                m.eval()  # LoRA dropout off
            for chunk in self.chunks:
                total += self._chunk_sum(parts, chunk, batch_size)
            for m, mode in zip(modules, modes):
                m.train(mode)
        return all_reduce_sum([total])[0] / self.count

    @staticmethod
    def _chunk_sum(parts: Parts, chunk: _Chunk, batch_size: int) -> float:
        """Sum over one bucket's rows of the per-row mean squared error."""
        total, sched = 0.0, parts.noise_scheduler
        for i in range(0, len(chunk.timesteps), batch_size):
            sl = slice(i, i + batch_size)
            latents, noise = chunk.latents[sl].to(parts.device), chunk.noise[sl].to(parts.device)
            t = chunk.timesteps[sl].to(parts.device)
            noisy = sched.add_noise(latents, noise, t)
            target = prediction_target(sched, latents, noise, t)
            time_ids = chunk.time_ids[sl] if chunk.time_ids is not None else None
            with parts.autocast():  # the training loss's dtypes (training.precision): fp32 inputs, cast per op
                if chunk.cond is not None:
                    cond = chunk.cond[sl].to(parts.device)
                else:
                    cond = parts.encode(chunk.input_ids[sl], raw=True)
                extra = parts.family.added_cond_kwargs(cond, time_ids)
                pred = parts.raw_unet(noisy, t, cond.prompt_embeds, added_cond_kwargs=extra).sample
            total += F.mse_loss(pred.float(), target.float(), reduction="sum").item() / noise[0].numel()
        return total
