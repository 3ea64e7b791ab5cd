"""The toy SDXL base model: the build trains an SDXL-architecture UNet conditioned exactly as the SDXL pipeline
conditions it at inference, writes a folder that loads as SDXL, and the shipped models/toy-sdxl is small and draws."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from training.families import family_for, family_of, load_pipeline
from training.sampling import generate
from training.toy_world import world
from training.toy_world.config import SdxlUnetBuild, ToySdxlConfig
from training.toy_world.sdxl import assemble_from_toy_parts, build_sdxl, caption_conditioning

MAX_BYTES = 15_000_000  # issue 20: models/toy-sdxl <= 15 MB


def tiny_config(repo, out_dir, **unet) -> ToySdxlConfig:
    """The build's config on the shipped toy parts with a tiny UNet and a few steps (seconds on CPU)."""
    values = dict(block_out_channels=[16, 32], attention_head_dim=4, steps=4, batch_size=4, pool_size=100) | unet
    return ToySdxlConfig(
        out_dir=str(out_dir),
        sd_model=str(repo / "models" / "toy-sd"),
        clip_model=str(repo / "models" / "toy-clip"),
        unet=SdxlUnetBuild(**values),
    )


def test_training_conditioning_is_what_the_pipeline_feeds_the_unet(repo, tmp_path):
    pipe = assemble_from_toy_parts(tiny_config(repo, tmp_path))
    captions = ["a red circle on a white background", "a blue square on a black background"]
    cond = caption_conditioning(pipe, captions)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        captions, device="cpu", do_classifier_free_guidance=True
    )
    # the UNet sees (prompt_embeds, text_embeds) rows; the dropped-caption row is the CFG negative (all zeros)
    torch.testing.assert_close(cond.prompt_embeds[:2], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled_prompt_embeds[:2], pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.prompt_embeds[2:].expand_as(negative), negative, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled_prompt_embeds[2:].expand_as(negative_pooled), negative_pooled)
    assert cond.prompt_embeds.shape[-1] == pipe.unet.config.cross_attention_dim == 256  # 128 + 128 wide encoders


def test_tiny_build_writes_an_sdxl_model_that_loads_and_draws(repo, tmp_path):
    summary = build_sdxl(tiny_config(repo, tmp_path))
    folder = tmp_path / "toy-sdxl"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy-sdxl"]  # the temporary folder was swapped in
    assert family_of(folder).name == "sdxl"
    pipe = load_pipeline(folder, "cpu")
    assert isinstance(pipe, StableDiffusionXLPipeline) and family_for(pipe).name == "sdxl"
    assert all(getattr(pipe, n).dtype == torch.float32 for n in ("unet", "vae", "text_encoder", "text_encoder_2"))
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time" and unet.down_block_types[0] == "DownBlock2D"
    assert unet.block_out_channels == [16, 32] and unet.use_linear_projection
    # the toy parts are reused unchanged: toy-sd's VAE latents scale and text encoder, toy-clip's projection
    toy_sd = load_pipeline(repo / "models" / "toy-sd", "cpu")
    assert pipe.vae.config.scaling_factor == toy_sd.vae.config.scaling_factor
    for (name, a), b in zip(pipe.text_encoder.state_dict().items(), toy_sd.text_encoder.state_dict().values()):
        assert torch.equal(a, b), name
    assert pipe.text_encoder_2.config.projection_dim == 128

    written = json.loads((folder / "toy_world_build.json").read_text())
    assert written["time_ids"] == [64.0, 64.0, 0.0, 0.0, 64.0, 64.0] == summary["time_ids"]
    assert 0 < written["final_loss"]["unet"] < 2 and written["params_m"]["unet"] > 0
    images = generate(pipe, ["a red circle on a white background"] * 2, steps=2)
    assert [im.size for im in images] == [(world.RESOLUTION, world.RESOLUTION)] * 2


def test_build_refuses_a_missing_clip_folder_before_writing(repo, tmp_path):
    cfg = tiny_config(repo, tmp_path / "out").model_copy(update={"clip_model": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="clip_model .* is not a CLIP folder"):
        build_sdxl(cfg)
    assert not (tmp_path / "out").exists()


def test_shipped_toy_sdxl_is_small_and_draws_64px(repo):
    folder = repo / "models" / "toy-sdxl"
    if not folder.exists():
        pytest.skip("models/toy-sdxl is not shipped in this checkout")
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) <= MAX_BYTES
    assert not list(folder.rglob("*.bin")), "weights must be safetensors only"
    pipe = load_pipeline(folder, "cpu")
    assert family_for(pipe).name == "sdxl"
    prompts = ["a red circle on a white background", "a blue square on a black background"]
    images = generate(pipe, prompts, steps=4)
    assert [im.size for im in images] == [(64, 64)] * 2
    # seeded: the same prompts and seeds draw the same images (same batch: CPU kernels differ by batch size)
    assert [im.tobytes() for im in generate(pipe, prompts, steps=4)] == [im.tobytes() for im in images]
    assert images[0].tobytes() != images[1].tobytes()


def test_quality_script_measures_an_sdxl_base(tmp_path, tiny_sdxl_dir):
    """evaluation.toy_quality runs on an SDXL folder (the same bar as toy-sd); a random tiny SDXL fails it."""
    from evaluation.toy_quality import main
    from training.toy_world.tiny import tiny_clip

    clip, processor = tiny_clip()
    clip.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    out = tmp_path / "q.json"
    args = ["--model", str(tiny_sdxl_dir), "--clip", str(tmp_path / "clip"), "--out", str(out)]
    assert main([*args, "--prompts-per-caption", "1", "--clip-images", "12", "--steps", "2"]) == 1
    report = json.loads(out.read_text())
    assert report["model"] == str(tiny_sdxl_dir) and report["generator"]["prompts"] == 36
    assert not all(report["passed"].values()) and report["generator"]["failures"]


TINY_OVERRIDES = [
    "unet.block_out_channels=[16, 32]",
    "unet.attention_head_dim=4",
    "unet.steps=3",
    "unet.batch_size=4",
    "unet.pool_size=100",
]


def test_build_sdxl_command_is_deterministic_and_rejects_bad_config(tmp_path, repo, capsys):
    from safetensors.torch import load_file

    from training.toy_world.__main__ import main

    cfg = str(repo / "configs" / "toy_world_sdxl.yaml")
    parts = [f"sd_model={repo / 'models' / 'toy-sd'}", f"clip_model={repo / 'models' / 'toy-clip'}"]
    assert main(["build-sdxl", "unet.steps=0", "--config", cfg, f"out_dir={tmp_path / 'x'}"]) == 2
    assert "unet.steps" in capsys.readouterr().err and not (tmp_path / "x").exists()
    for name in ("a", "b"):  # options among the overrides, as `build` takes them
        assert main(["build-sdxl", *TINY_OVERRIDES, "--config", cfg, *parts, f"out_dir={tmp_path / name}"]) == 0
    weights = "toy-sdxl/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "a" / weights), load_file(tmp_path / "b" / weights)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert f"wrote {tmp_path / 'b'}/toy-sdxl" in capsys.readouterr().out
