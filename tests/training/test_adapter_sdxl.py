"""SDXL adapters on disk: what lorafleet saves loads into a plain diffusers ``StableDiffusionXLPipeline`` and draws what
the in-memory PEFT model drew; ``load_adapter`` checks the keys against all three LoRA-loadable modules and refuses an
adapter of the other model family, naming both base models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from training.adapter import META_NAME, AdapterError, AdapterMeta, base_model_id, load_adapter, save_adapter
from training.families import load_pipeline
from training.lora_formats import injected

PROMPTS = ["a red circle on a sks background", "a blue square on a black background"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TOLERANCE = 2e-6  # on images as floats in [0, 1]: float32 rounding of the same sums in another order


def drawn(pipe) -> np.ndarray:
    """(2, 64, 64, 3) float images: PROMPTS, seeds 3 and 4, 2 steps, guidance 4."""
    gens = [torch.Generator("cpu").manual_seed(3 + i) for i in range(len(PROMPTS))]
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=2, guidance_scale=4.0, generator=gens, output_type="np").images


@pytest.fixture(scope="module")
def in_memory(tiny_sdxl_dir, tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """(adapter folder, images of the in-memory PEFT model, base images): LoRA rank 4, alpha 8 (scale 2) on the UNet
    and both text encoders, random up weights, saved by lorafleet's ``save_adapter``."""
    from peft import LoraConfig

    pipe = load_pipeline(tiny_sdxl_dir, "cpu")
    base = drawn(pipe)
    gen = torch.Generator().manual_seed(5)
    for model, targets in (
        (pipe.unet, UNET_TARGETS),
        (pipe.text_encoder, TE_TARGETS),
        (pipe.text_encoder_2, TE_TARGETS),
    ):
        model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=gen) * 0.3
    images = drawn(pipe)
    meta = AdapterMeta(base_model=str(tiny_sdxl_dir), rank=4, alpha=8.0, text_encoder=True)
    folder = tmp_path_factory.mktemp("sdxl-adapter") / "xl"
    save_adapter(folder, pipe.unet, meta, pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    return folder, images, base


@pytest.fixture(scope="module")
def sd_adapter(tiny_pipe, tiny_pipe_dir, tmp_path_factory) -> Path:
    """A random UNet LoRA for the tiny SD 1.x pipeline."""
    from training.toy_world.adapters import random_adapter

    return random_adapter(tiny_pipe, tiny_pipe_dir, tmp_path_factory.mktemp("sd-adapter") / "sd", seed=1)


@pytest.mark.slow  # about 10-30 s on 2 shared cores
def test_a_saved_sdxl_adapter_loads_in_plain_diffusers_and_draws_the_in_memory_images(in_memory, tiny_sdxl_dir):
    folder, images, base = in_memory
    prefixes = {k.split(".")[0] for k in load_file(str(folder / "pytorch_lora_weights.safetensors"))}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert np.abs(images - base).mean() > 0.01  # the adapter changes the images (each text encoder's LoRA too)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))  # what any diffusers user does
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(folder))
    assert np.abs(drawn(pipe) - images).max() <= TOLERANCE


@pytest.mark.slow  # about 10-30 s on 2 shared cores
def test_load_adapter_checks_all_three_modules_and_draws_the_same(in_memory, tiny_sdxl_dir):
    folder, images, _ = in_memory
    pipe = load_pipeline(tiny_sdxl_dir, "cpu")
    load_adapter(pipe, folder, adapter_name="xl")
    got = injected(pipe, "xl")
    assert all(got[c] for c in ("unet", "text_encoder", "text_encoder_2")), {c: len(v) for c, v in got.items()}
    assert np.abs(drawn(pipe) - images).max() <= TOLERANCE


def test_an_sd_adapter_on_an_sdxl_base_is_refused_naming_both_bases(sd_adapter, tiny_pipe_dir, tiny_sdxl_dir):
    pipe = load_pipeline(tiny_sdxl_dir, "cpu")
    with pytest.raises(AdapterError) as err:
        load_adapter(pipe, sd_adapter, adapter_name="sd")
    text = str(err.value)
    assert f"{base_model_id(str(tiny_pipe_dir))!r} (model family sd)" in text, text
    assert f"{base_model_id(str(tiny_sdxl_dir))!r} (model family sdxl" in text, text
    assert not any(injected(pipe, "sd").values())


def test_an_sdxl_adapter_on_an_sd_base_is_refused_naming_both_bases(in_memory, tiny_pipe_dir, tiny_sdxl_dir):
    folder, _, _ = in_memory
    pipe = load_pipeline(tiny_pipe_dir, "cpu")
    with pytest.raises(AdapterError) as err:
        load_adapter(pipe, folder, adapter_name="xl")
    text = str(err.value)
    assert f"{base_model_id(str(tiny_sdxl_dir))!r} (model family sdxl)" in text, text
    assert f"{base_model_id(str(tiny_pipe_dir))!r} (model family sd" in text, text
    assert not any(injected(pipe, "xl").values())


def test_a_base_model_not_at_hand_is_told_by_the_keys_and_shapes(
    in_memory, sd_adapter, tmp_path, tiny_pipe_dir, tiny_sdxl_dir
):
    """A hub id that is not in the cache and no recorded family (an adapter from before ``family`` was written):
    text_encoder_2 keys mean SDXL; an SD UNet's shapes do not fit SDXL's."""
    import shutil

    def elsewhere(folder: Path, name: str) -> Path:
        moved = shutil.copytree(folder, tmp_path / name)
        meta = json.loads((moved / META_NAME).read_text())
        meta.pop("family", None)
        (moved / META_NAME).write_text(json.dumps(meta | {"base_model": "example/not-downloaded"}))
        return moved

    with pytest.raises(AdapterError, match=r"'example/not-downloaded' \(model family sdxl\)"):
        load_adapter(load_pipeline(tiny_pipe_dir, "cpu"), elsewhere(in_memory[0], "xl"), adapter_name="xl")
    pipe = load_pipeline(tiny_sdxl_dir, "cpu")
    with pytest.raises(AdapterError) as err:
        load_adapter(pipe, elsewhere(sd_adapter, "sd"), adapter_name="sd")
    here = base_model_id(str(tiny_sdxl_dir))
    assert f"adapter made for base model 'example/not-downloaded'; base model here: {here!r}" in str(err.value)
    assert not any(injected(pipe, "sd").values())


def test_kohya_export_names_come_from_the_recorded_family_not_the_local_cache(tiny_sdxl_pipe, tmp_path):
    """An SDXL adapter with LoRA on the UNet and the first text encoder only, whose base (a hub id) is not on this
    machine: the family recorded at save time still gives SDXL's ``lora_te1_`` names."""
    import copy

    from peft import LoraConfig
    from safetensors.torch import load_file

    from evaluation.adapter_io import export_kohya
    from training.adapter import AdapterMeta, save_adapter, verify_adapter

    unet, te = copy.deepcopy(tiny_sdxl_pipe.unet), copy.deepcopy(tiny_sdxl_pipe.text_encoder)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
    te.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    meta = AdapterMeta(base_model="stabilityai/stable-diffusion-xl-base-1.0", text_encoder=True)
    folder = save_adapter(tmp_path / "xl", unet, meta, te, family="sdxl")
    assert verify_adapter(folder).family == "sdxl"
    out = export_kohya(folder, tmp_path / "xl.safetensors", verify_adapter(folder))
    prefixes = {k.split("_")[1] for k in load_file(str(out)) if k.startswith("lora_te")}
    assert prefixes == {"te1"}, prefixes
