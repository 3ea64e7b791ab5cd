"""Build the toy world's models from scratch: ``models/toy-clip`` and ``models/toy-sd``.

Order: tokenizer -> toy CLIP (contrastive, wider world) -> VAE (wider world) ->
UNet (base world, conditioned on the frozen CLIP text tower). Everything is a function of
``cfg.seed``. Outputs are written to temporary folders and swapped in only at the end, so
a failed or interrupted build never leaves half-written models behind.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from training.toy_world import world
from training.toy_world.clip import build_clip, build_processor, caption_table, train_clip
from training.toy_world.common import seed_everything
from training.toy_world.config import ToyWorldConfig
from training.toy_world.sd import (
    assemble_pipeline,
    build_unet,
    build_vae,
    encode_latents,
    encode_prompts,
    reconstruction_error,
    text_encoder_from_clip,
    train_unet,
    train_vae,
)
from training.toy_world.tokenizer import build_tokenizer

SD_DIR, CLIP_DIR = "toy-sd", "toy-clip"


def _swap_in(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def build(cfg: ToyWorldConfig) -> dict:
    """Train and save both toy models; return a summary (losses, timings, parameter counts)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    gen = seed_everything(cfg.seed)

    t0 = time.perf_counter()
    tokenizer = build_tokenizer([world.caption_for(*a) for a in caption_table()], cfg.max_length)
    clip = build_clip(tokenizer, cfg.clip, cfg.max_length)
    clip_losses = train_clip(clip, tokenizer, cfg.clip, gen, seed=cfg.seed)
    timings["clip_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    wide = world.render_array(world.scenes(cfg.seed + 1, cfg.vae.pool_size, backgrounds=world.BACKGROUNDS))
    vae = build_vae(cfg.vae)
    vae_losses = train_vae(vae, cfg.vae, gen, wide)
    held_out = world.render_array(world.scenes(cfg.seed + 3, 256, backgrounds=world.BACKGROUNDS))
    vae_mae = reconstruction_error(vae, held_out)
    print(f"VAE held-out reconstruction error: {vae_mae:.2f} / 255 per pixel", flush=True)
    timings["vae_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    base_scenes = world.scenes(cfg.seed + 2, cfg.unet.pool_size)
    latents = encode_latents(vae, world.render_array(base_scenes))
    text_encoder = text_encoder_from_clip(clip)
    captions = world.base_captions()
    prompt_embeds = encode_prompts(text_encoder, tokenizer, [*captions, ""])
    caption_ids = torch.tensor([captions.index(s.caption) for s in base_scenes])
    unet = build_unet(cfg.unet, cfg.vae.latent_channels, text_encoder.config.hidden_size)
    unet_losses = train_unet(unet, cfg.unet, gen, latents, caption_ids, prompt_embeds)
    timings["unet_s"] = time.perf_counter() - t0

    # fp16 storage keeps the shipped weights small; diffusers loads them back as fp32.
    # The text encoder and CLIP stay fp32: transformers keeps the stored dtype.
    pipe = assemble_pipeline(vae.half(), text_encoder, tokenizer, unet.half())
    tmp_sd, tmp_clip = out / f".{SD_DIR}.tmp", out / f".{CLIP_DIR}.tmp"
    for tmp in (tmp_sd, tmp_clip):
        shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp_sd, safe_serialization=True)
    clip.save_pretrained(tmp_clip, safe_serialization=True)
    build_processor(tokenizer).save_pretrained(tmp_clip)

    summary = {
        "seed": cfg.seed,
        "config": cfg.model_dump(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "params_m": {
            "clip": round(sum(p.numel() for p in clip.parameters()) / 1e6, 3),
            "vae": round(sum(p.numel() for p in vae.parameters()) / 1e6, 3),
            "unet": round(sum(p.numel() for p in unet.parameters()) / 1e6, 3),
        },
        "vae_heldout_mae_255": round(vae_mae, 3),
        "final_loss": {
            "clip": round(sum(clip_losses[-50:]) / 50, 5),
            "vae": round(sum(vae_losses[-50:]) / 50, 5),
            "unet": round(sum(unet_losses[-200:]) / 200, 5),
        },
    }
    (tmp_sd / "toy_world_build.json").write_text(json.dumps(summary, indent=2) + "\n")
    _swap_in(tmp_sd, out / SD_DIR)
    _swap_in(tmp_clip, out / CLIP_DIR)
    return summary
