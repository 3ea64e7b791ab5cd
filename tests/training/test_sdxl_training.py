"""SDXL training on the tiny SDXL pipeline (no Ray): sources with pooled embeds and time ids, text-encoder LoRA on
both encoders, checkpoints that plain ``StableDiffusionXLPipeline.load_lora_weights`` reads and that resume, the
VAE's dtype, the default resolution and both tokenizers' caption limits."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from PIL import Image

from training.buckets import assign_buckets, resolve_resolution
from training.captions import load_tokenizers
from training.config import DataConfig
from training.data import DatasetError, DatasetReport, validate_dataset
from training.dataset import EncodedSource, PixelSource, load_image, load_image_and_crop, make_source
from training.heldout import HeldOut
from training.loop import denoising_loss, make_state, train_loop
from training.precision import resolve_precision
from training.training_set import check_caption_lengths
from training.worker import WorkerSpec, adapter_meta, build_worker_parts, read_checkpoint, write_checkpoint

CPU = torch.device("cpu")


def _sdxl_cfg(train_config, model_dir, **overrides):
    return train_config(**{"base_model": str(model_dir), "train.epochs": 1, **overrides})


def _lora(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


# -- time ids -----------------------------------------------------------------------------------------------
def test_time_ids_of_a_600x400_image_in_its_bucket_are_diffusers(tmp_path):
    """diffusers' train_text_to_image_lora_sdxl.py: original_size = (image.height, image.width) before resizing;
    crop_top_left = (y1, x1) of the crop in the resized image (center: round((H - h) / 2)), taken after the flip;
    target = the trained size. Here the target is the image's bucket."""
    path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 600, 3), dtype=np.uint8)).save(path)
    bucket = assign_buckets([path], DataConfig(path=str(tmp_path), resolution=64), 16)[0]
    assert bucket == (80, 48)  # (width, height): landscape
    width, height = bucket
    img = Image.open(path).convert("RGB")
    scale = max(width / img.width, height / img.height)
    resized = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))),
                         Image.Resampling.BICUBIC)  # fmt: skip

    pixels, crop = load_image_and_crop(path, bucket, "center")
    y1 = max(0, int(round((resized.height - height) / 2.0)))
    x1 = max(0, int(round((resized.width - width) / 2.0)))
    assert crop.time_ids().tolist() == [400, 600, y1, x1, 48, 80] == [400, 600, 2, 0, 48, 80]
    assert torch.equal(pixels, load_image(path, bucket, "center"))  # load_image keeps its pixels

    for seed in range(4):  # random crops, mirrored: (y, x) is where the crop sits in the mirrored resized image
        gen = torch.Generator().manual_seed(seed)
        pixels, crop = load_image_and_crop(path, bucket, "random", flip=True, gen=gen)
        y, x = crop.top_left
        mirrored = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((x, y, x + width, y + height))
        want = torch.from_numpy(np.asarray(mirrored).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
        assert torch.equal(pixels, want), seed
        assert crop.original_size == (400, 600) and crop.target_size == (48, 80)


# -- sources, loss, held-out loss ---------------------------------------------------------------------------
def test_sdxl_batches_carry_both_encoders_pooled_embeds_and_time_ids(train_config, tiny_sdxl_dir, tiny_sdxl_pipe):
    cfg = _sdxl_cfg(train_config, tiny_sdxl_dir, **{"data.random_flip": True, "validation.holdout": 2})
    parts = build_worker_parts(cfg, CPU)
    assert parts.family.name == "sdxl" and set(parts.text_encoders) == {"text_encoder", "text_encoder_2"}
    examples = validate_dataset(cfg.data).examples
    cached, raw = make_source(examples, cfg.data, parts, True), make_source(examples, cfg.data, parts, False)
    assert isinstance(cached, EncodedSource) and isinstance(raw, PixelSource)
    b = cached.batch([0, 3], torch.Generator().manual_seed(0))
    assert b.input_ids.shape == (2, 2, tiny_sdxl_pipe.tokenizer.model_max_length)
    embeds, pooled = tiny_sdxl_pipe.encode_prompt(
        [examples[i].caption for i in (0, 3)], do_classifier_free_guidance=False
    )[::2]
    assert torch.allclose(b.prompt_embeds, embeds, atol=1e-5) and torch.allclose(
        b.pooled_prompt_embeds, pooled, atol=1e-5
    )
    assert b.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2  # 64 px toy images: no resize, no crop
    assert torch.equal(cached.time_ids[:, 1], cached.time_ids[:, 0])  # the mirror of an uncropped image: x = 0 too
    loss = denoising_loss(parts, b, cfg.train, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is not None for p in parts.trainable)
    p = raw.batch([0, 3], torch.Generator().manual_seed(0))
    assert p.time_ids.shape == (2, 6) and torch.equal(p.prompt_embeds, b.prompt_embeds)

    train, held = examples[2:], examples[:2]
    heldout = HeldOut(held, cfg, parts)
    assert heldout.chunks[0].time_ids.tolist()[0] == [64, 64, 0, 0, 64, 64]
    first = heldout.loss(parts)
    assert np.isfinite(first) and first == heldout.loss(parts)  # fixed problems: the same value twice
    assert len(train) == len(examples) - 2


# -- text-encoder LoRA on both encoders, save, load, resume -------------------------------------------------
@pytest.fixture(scope="module")
def sdxl_two_layer_dir(tiny_sdxl_dir):
    """The tiny SDXL: its text encoders have 2 layers (SDXL's first encoder gives its penultimate hidden states,
    so a 1-layer one would have no layer whose LoRA could reach the UNet)."""
    return tiny_sdxl_dir


def test_text_encoder_lora_trains_both_encoders_saves_loads_and_resumes(train_config, sdxl_two_layer_dir, tmp_path):
    cfg = _sdxl_cfg(train_config, sdxl_two_layer_dir, **{"lora.text_encoder": True, "train.max_steps": 3,
                                                          "train.batch_size": 2, "train.lr": 1e-2})  # fmt: skip
    parts = build_worker_parts(cfg, CPU)
    assert parts.lora_text_encoders == ("text_encoder", "text_encoder_2")
    te1, te2 = parts.raw_text_encoders["text_encoder"], parts.raw_text_encoders["text_encoder_2"]
    assert not any("layers.1." in n for n in _lora(te1))  # its last layer never reaches the UNet
    assert any("layers.1." in n for n in _lora(te2))  # the pooled embeds come from text_encoder_2's last layer
    before = [_lora(m) for m in (parts.raw_unet, te1, te2)]
    examples = validate_dataset(cfg.data).examples
    source = make_source(examples, cfg.data, parts, cfg.use_cache)
    assert source.prompt_embeds is None  # the encoders train: no cached conditioning
    state = make_state(cfg, parts, source.batches_per_epoch(cfg.train.batch_size))
    train_loop(cfg, parts, source, state, report=lambda m, s: None)
    assert state.step == 3 and np.isfinite(state.history[-1]["loss"])
    for old, module in zip(before, (parts.raw_unet, te1, te2)):
        new = _lora(module)
        assert any(not torch.equal(old[n], new[n]) for n in old), type(module).__name__  # every module learned

    spec = WorkerSpec(cfg, examples, "hash")
    ckpt = write_checkpoint(tmp_path / "ckpt", parts, state, adapter_meta(spec, state))
    weights = json.loads((ckpt / "adapter" / "lorafleet_adapter.json").read_text())["weights"]
    plain = StableDiffusionXLPipeline.from_pretrained(sdxl_two_layer_dir)
    plain.load_lora_weights(str(ckpt / "adapter"), weight_name=weights)
    prompt = "a red circle on a sks background"
    with torch.no_grad():
        ours = parts.pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        theirs = plain.encode_prompt(prompt, do_classifier_free_guidance=False)
    assert torch.allclose(ours[0], theirs[0], atol=1e-5) and torch.allclose(ours[2], theirs[2], atol=1e-5)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    extra = {"text_embeds": ours[2], "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        mine, plain_out = (p.unet(x, t, ours[0], added_cond_kwargs=extra).sample for p in (parts.pipe, plain))
    assert torch.allclose(mine, plain_out, atol=1e-5)

    resumed = build_worker_parts(cfg, CPU)
    state2 = make_state(cfg, resumed, source.batches_per_epoch(cfg.train.batch_size))
    read_checkpoint(ckpt, resumed, state2)
    for a, b in zip((parts.raw_unet, te1, te2), (resumed.raw_unet, *resumed.raw_text_encoders.values())):
        assert all(torch.equal(x, _lora(b)[n]) for n, x in _lora(a).items())
    assert state2.step == 3
    cfg4 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 4})})
    state2.total_steps = 4
    train_loop(cfg4, resumed, make_source(examples, cfg.data, resumed, cfg.use_cache), state2, report=lambda m, s: None)
    assert state2.step == 4


# -- VAE dtype, default resolution, tokenizers ----------------------------------------------------------------
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize(
    "choice, force_upcast, sdxl, vae",
    [
        ("fp16", True, True, F32),  # SDXL's own VAE overflows in fp16
        ("bf16", True, True, F32),  # and stays fp32 under bf16 too, as diffusers' SDXL LoRA scripts keep it
        ("fp16", False, True, F16),  # madebyollin/sdxl-vae-fp16-fix: force_upcast false
        ("bf16", False, True, BF16),
        ("bf16", True, False, BF16),  # SD 1.x unchanged
        ("no", True, True, F32),
    ],
)
def test_the_vae_dtype_for_each_combination(choice, force_upcast, sdxl, vae):
    p = resolve_precision(
        choice, torch.device("cuda"), vae_force_upcast=force_upcast, bf16_supported=True, vae_fp32_in_bf16=sdxl
    )
    assert p.vae_dtype == vae and p.weight_dtype == {"no": F32, "fp16": F16, "bf16": BF16}[choice]


def test_a_configured_vae_replaces_the_models_own(train_config, tiny_sdxl_dir, tmp_path):
    other = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae")
    torch.nn.init.normal_(other.decoder.conv_out.weight)
    other.register_to_config(force_upcast=False)
    other.save_pretrained(tmp_path / "vae-fp16-fix")
    cfg = _sdxl_cfg(train_config, tiny_sdxl_dir, pretrained_vae_model_name_or_path=str(tmp_path / "vae-fp16-fix"))
    parts = build_worker_parts(cfg, CPU)
    assert torch.equal(parts.vae.decoder.conv_out.weight, other.decoder.conv_out.weight)
    assert parts.vae.config.force_upcast is False


def test_resolution_defaults_to_the_models_native_size(train_config, tiny_sdxl_dir, tmp_path):
    assert resolve_resolution(_sdxl_cfg(train_config, tiny_sdxl_dir)).data.resolution == 64  # 8 latents × 8
    big = tmp_path / "sdxl-1024"
    for sub in ("unet", "vae"):
        (big / sub).mkdir(parents=True)
        config = json.loads((tiny_sdxl_dir / sub / "config.json").read_text())
        (big / sub / "config.json").write_text(json.dumps(config | ({"sample_size": 128} if sub == "unet" else {})))
    shutil.copy(tiny_sdxl_dir / "model_index.json", big / "model_index.json")
    assert resolve_resolution(_sdxl_cfg(train_config, big)).data.resolution == 1024
    only_index = tmp_path / "index-only"
    only_index.mkdir()
    shutil.copy(tiny_sdxl_dir / "model_index.json", only_index / "model_index.json")
    assert resolve_resolution(_sdxl_cfg(train_config, only_index)).data.resolution == 1024  # the family's default
    assert resolve_resolution(_sdxl_cfg(train_config, big, **{"data.resolution": 64})).data.resolution == 64


def test_caption_lengths_are_checked_with_every_tokenizer(train_config, tiny_sdxl_dir):
    toks = load_tokenizers(str(tiny_sdxl_dir))
    assert set(toks) == {"tokenizer", "tokenizer_2"}
    cfg = _sdxl_cfg(train_config, tiny_sdxl_dir)
    report = validate_dataset(cfg.data)
    assert check_caption_lengths(cfg, report) == []
    limit = toks["tokenizer"].model_max_length
    long_caption = "a red circle on a white background " * limit + "sks"
    cut = DatasetReport(report.root, report.format, [replace(report.examples[0], caption=long_caption)])
    with pytest.raises(DatasetError, match="trigger 'sks' lies past the cut"):
        check_caption_lengths(cfg, cut)
