"""SD 2.x's v-prediction through the SD family: a tiny SD whose scheduler config says ``prediction_type:
v_prediction``, saved and loaded through ``from_pretrained``, trains against ``get_velocity`` targets with min-SNR's
v form, min(SNR, γ)/(SNR + 1) (diffusers' ``train_text_to_image.py``), and scores a held-out loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from training.data import validate_dataset
from training.dataset import make_source
from training.heldout import HeldOut
from training.loop import denoising_loss, make_state, prediction_target, train_loop
from training.worker import build_worker_parts

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_v_dir(tmp_path_factory, tiny_pipe):
    path = tmp_path_factory.mktemp("tiny-sd-v")
    tiny_pipe.save_pretrained(path, safe_serialization=True)
    config = path / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"prediction_type": "v_prediction"}))
    return path


def test_v_prediction_trains_against_velocity_with_the_v_form_of_min_snr(train_config, tiny_v_dir):
    cfg = train_config(**{"base_model": str(tiny_v_dir), "train.max_steps": 3, "train.snr_gamma": 5.0,
                          "validation.holdout": 2})  # fmt: skip
    parts = build_worker_parts(cfg, CPU)
    assert parts.family.name == "sd" and parts.noise_scheduler.config.prediction_type == "v_prediction"
    examples = validate_dataset(cfg.data).examples
    source = make_source(examples[2:], cfg.data, parts, True)
    batch = source.batch([0, 1, 2], torch.Generator().manual_seed(0))

    gen = torch.Generator().manual_seed(7)  # the draws of denoising_loss, in its order
    sched, scale = parts.noise_scheduler, parts.vae.config.scaling_factor
    latents = (batch.latent_mean + batch.latent_std * torch.randn(batch.latent_mean.shape, generator=gen)) * scale
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (3,), generator=gen)
    target = prediction_target(sched, latents, noise, t)
    alphas = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigmas = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(target, alphas * noise - sigmas * latents, atol=1e-6)  # v = α·ε − σ·x₀
    with torch.no_grad():
        pred = parts.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=batch.prompt_embeds).sample
        mse = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        snr = compute_snr(sched, t)
        v_form = (mse * torch.clamp(snr, max=5.0) / (snr + 1)).mean()
        eps_form = (mse * torch.clamp(snr, max=5.0) / snr).mean()
        loss = denoising_loss(parts, batch, cfg.train, torch.Generator().manual_seed(7))
    assert torch.allclose(loss, v_form, rtol=1e-5) and not torch.allclose(loss, eps_form, rtol=1e-3)

    held = HeldOut(examples[:2], cfg, parts)
    before = held.loss(parts)
    state = make_state(cfg, parts, source.batches_per_epoch(cfg.train.batch_size))
    train_loop(cfg, parts, source, state, report=lambda m, s: None)
    assert state.step == 3 and all(np.isfinite(h["loss"]) for h in state.history)
    assert np.isfinite(before) and np.isfinite(held.loss(parts)) and held.loss(parts) != before


def test_an_unknown_prediction_type_is_refused_naming_the_scheduler_config(train_config, tiny_v_dir):
    cfg = train_config(**{"base_model": str(tiny_v_dir)})
    parts = build_worker_parts(cfg, CPU)
    parts.noise_scheduler.register_to_config(prediction_type="sample")
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="prediction_type.*epsilon and v_prediction"):
        prediction_target(parts.noise_scheduler, x, x, torch.tensor([1]))
