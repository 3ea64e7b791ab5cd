"""Model families: detected from model_index.json (folder or hub cache), never from the name; each family's
prompt encoding equals its diffusers pipeline's own ``encode_prompt``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from training.families import FamilyError, family_for, family_of, load_pipeline

REPO = Path(__file__).resolve().parents[2]


def test_the_family_comes_from_model_index_not_the_folder_name(tmp_path, tiny_pipe_dir, tiny_sdxl_dir):
    misleading_sd = shutil.copytree(tiny_pipe_dir, tmp_path / "my-sdxl-finetune")
    misleading_xl = shutil.copytree(tiny_sdxl_dir, tmp_path / "stable-diffusion-v1-5")
    assert family_of(misleading_sd).name == "sd"
    assert family_of(misleading_xl).name == "sdxl"
    assert family_of(REPO / "models" / "toy-sd").name == "sd"
    assert isinstance(load_pipeline(misleading_xl, "cpu"), StableDiffusionXLPipeline)
    assert type(load_pipeline(misleading_sd, "cpu")) is StableDiffusionPipeline


def test_an_unknown_pipeline_class_is_refused_naming_the_supported_ones(tmp_path, tiny_pipe_dir):
    other = shutil.copytree(tiny_pipe_dir, tmp_path / "flux")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(index | {"_class_name": "FluxPipeline"}))
    with pytest.raises(FamilyError, match=r"FluxPipeline.*StableDiffusionPipeline \(sd\).*StableDiffusionXLPipeline"):
        family_of(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        family_of(tmp_path / "empty")


def test_a_hub_id_is_detected_from_the_hugging_face_cache(tmp_path, tiny_sdxl_dir, monkeypatch):
    """The hub path: ``org/name`` resolved offline from a cache laid out as huggingface_hub writes it."""
    repo = tmp_path / "hub" / "models--example--tiny-sdxl"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_sdxl_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert family_of("example/tiny-sdxl").name == "sdxl"
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        family_of("example/not-downloaded")


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_encode_equals_the_pipelines_encode_prompt(which, tiny_pipe, tiny_sdxl_pipe):
    pipe = tiny_pipe if which == "sd" else tiny_sdxl_pipe
    family = family_for(pipe)
    captions = ["a red circle on a white background", "sks blue square"]
    ids = family.tokenize(pipe, captions)
    assert ids.shape[:2] == (2, len(family.text_encoder_names))
    with torch.no_grad():
        cond = family.encode(pipe, ids)
        expected = pipe.encode_prompt(
            captions, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    torch.testing.assert_close(cond.prompt_embeds, expected[0], rtol=0, atol=0)
    if which == "sdxl":
        torch.testing.assert_close(cond.pooled_prompt_embeds, expected[2], rtol=0, atol=0)
        assert family.time_ids((48, 64), (0, 8), (32, 32)).tolist() == [48, 64, 0, 8, 32, 32]
        assert set(family.lora_modules(pipe)) == {"unet", "text_encoder", "text_encoder_2"}
    else:
        assert cond.pooled_prompt_embeds is None and family.added_cond_kwargs(cond, None) is None


def test_an_fp16_fixed_vae_replaces_the_models_own(tmp_path, tiny_sdxl_dir, tiny_sdxl_pipe):
    vae_dir = tmp_path / "vae-fix"
    vae = type(tiny_sdxl_pipe.vae).from_config(dict(tiny_sdxl_pipe.vae.config), force_upcast=False)
    vae.save_pretrained(vae_dir)
    pipe = load_pipeline(tiny_sdxl_dir, "cpu", vae=vae_dir)
    assert pipe.vae.config.force_upcast is False
    with pytest.raises(FileNotFoundError, match="cannot load vae"):
        load_pipeline(tiny_sdxl_dir, "cpu", vae=tmp_path / "missing")


def test_a_vae_is_taken_from_a_pipeline_folder_and_must_share_the_latent_space(tmp_path, tiny_sdxl_dir, tiny_sdxl_pipe):
    from training.families import load_vae

    assert load_vae(tiny_sdxl_dir, tiny_sdxl_dir, torch.float32).config.latent_channels == 4  # its vae/ subfolder
    with pytest.raises(FamilyError, match="not an AutoencoderKL"):
        load_vae(tiny_sdxl_dir / "unet", tiny_sdxl_dir, torch.float32)
    other = tmp_path / "sd-vae"
    config = dict(tiny_sdxl_pipe.vae.config)
    type(tiny_sdxl_pipe.vae).from_config(config, scaling_factor=config["scaling_factor"] * 1.4).save_pretrained(other)
    with pytest.raises(FamilyError, match="scaling_factor.*another latent space"):
        load_vae(other, tiny_sdxl_dir, torch.float32)


def test_an_sdxl_model_without_its_first_text_encoder_is_refused(tmp_path, tiny_sdxl_dir):
    refiner = shutil.copytree(tiny_sdxl_dir, tmp_path / "refiner-like")
    index = json.loads((refiner / "model_index.json").read_text())
    index |= {"text_encoder": [None, None], "tokenizer": [None, None]}
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FamilyError, match="without text_encoder, tokenizer.*refiner"):
        family_of(refiner)
