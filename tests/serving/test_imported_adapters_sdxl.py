"""SDXL adapters through kohya's layout: a lorafleet SDXL adapter (UNet + both text encoders) exported to A1111/ComfyUI
keys (``lora_unet_``, ``lora_te1_``, ``lora_te2_``) loads in plain diffusers, imports back, and the imported adapter
serves the original's images, alone and in a mixed pass (within 1/255, the SD tests' tolerance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from evaluation.adapter_io import main_export, main_import
from serving.engine import Engine, ImageRequest
from tests.serving.conftest import tiny_serve_args
from tests.serving.test_engine import PROMPT, pixels, run
from training.adapter import verify_adapter


@pytest.fixture(scope="module")
def xl_adapter(tiny_sdxl_pipe, tiny_sdxl_dir, tmp_path_factory) -> Path:
    from training.toy_world.adapters import random_adapter

    root = tmp_path_factory.mktemp("xl-kohya")
    return random_adapter(tiny_sdxl_pipe, tiny_sdxl_dir, root / "original", seed=50, text_encoders=True)


@pytest.fixture(scope="module")
def kohya_file(xl_adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("xl-kohya-file") / "my_xl_style.safetensors"
    assert main_export([str(xl_adapter), str(out), "--format", "kohya"]) == 0
    return out


@pytest.mark.slow  # about 10-30 s on 2 shared cores
def test_the_kohya_export_has_sdxl_keys_and_plain_diffusers_draws_what_the_original_draws(
    xl_adapter, kohya_file, tiny_sdxl_dir
):
    keys = load_file(str(kohya_file))
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}, sorted(keys)[:4]
    assert all(k.startswith(("lora_unet_", "lora_te1_text_model_", "lora_te2_text_model_")) for k in keys)

    def drawn(lora: Path) -> np.ndarray:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        gens = [torch.Generator("cpu").manual_seed(7)]
        return pipe([PROMPT], num_inference_steps=2, generator=gens, output_type="np").images

    original = drawn(xl_adapter / verify_adapter(xl_adapter).weights)
    assert np.abs(drawn(kohya_file) - original).max() <= 2e-6


@pytest.mark.slow  # about 10-30 s on 2 shared cores
def test_an_imported_kohya_sdxl_file_serves_the_originals_images(xl_adapter, kohya_file, tiny_sdxl_dir, tmp_path):
    out = tmp_path / "imported"
    args = [str(kohya_file), "--name", "my-xl-style", "--base-model", str(tiny_sdxl_dir), "--out", str(out)]
    assert main_import([*args, "--no-register"]) == 0
    meta = verify_adapter(out)
    assert (meta.source, meta.source_format, meta.rank, meta.text_encoder) == ("imported", "kohya", 4, True)
    prefixes = {k.split(".")[0] for k in load_file(str(out / meta.weights))}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}

    served = tiny_serve_args(
        tiny_sdxl_dir, {"original": xl_adapter, "imported": out}, tmp_path / "cache", warmup=False,
        **{"defaults.steps": 2},
    )  # fmt: skip
    engine = Engine.from_args(served)
    reqs = [ImageRequest(PROMPT, model=m, seed=9 + i) for i, m in enumerate(["imported", "base", "original"])]
    mixed = run(engine, *reqs)
    assert len({r.pass_id for r in mixed}) == 1
    alone = {r.model: run(engine, r)[0] for r in reqs}
    for req, got in zip(reqs, mixed):
        assert np.abs(pixels(got.images[0]) - pixels(alone[req.model].images[0])).max() <= 1, req.model
    same_seed = run(engine, *[ImageRequest(PROMPT, model=m, seed=9) for m in ("original", "imported", "base")])
    original, imported, base = (pixels(r.images[0]) for r in same_seed)
    assert np.abs(original - base).mean() > 2  # the adapter changes the images
    assert np.abs(imported - original).max() <= 1, "lorafleet -> kohya -> lorafleet must draw the same (≤ 1/255)"
