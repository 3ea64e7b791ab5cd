"""LoRA files from other tools (PEFT's own layout, kohya/A1111) load as the same adapter in diffusers layout does;
a file that matches no module, or changes nothing, is refused instead of serving the base model."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from training.adapter import META_NAME, AdapterError, AdapterMeta, file_sha256, load_adapter, save_adapter
from training.families import load_pipeline
from training.lora_formats import injected, read_lora, to_kohya
from training.sampling import generate

PROMPTS = ["a red circle on a sks background", "a blue square on a black background"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def images(pipe) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) for im in generate(pipe, PROMPTS, seed=3, steps=4)])


@pytest.fixture(scope="module")
def pipe(tiny_pipe_dir):
    """A pipeline of its own (adapters get loaded into it; the session's tiny_pipe stays clean)."""
    return load_pipeline(tiny_pipe_dir, device="cpu")


@pytest.fixture(scope="module")
def peft_unet(tiny_pipe):
    """The tiny UNet with a random LoRA (rank 4, alpha 8: scale 2, which every layout must keep) as a PeftModel."""
    from peft import LoraConfig, get_peft_model

    unet = get_peft_model(
        copy.deepcopy(tiny_pipe.unet),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian"),
    )
    gen = torch.Generator().manual_seed(7)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.3
    return unet


def lorafleet_folder(folder: Path, base: Path, weights: str, **extra) -> Path:
    """Add lorafleet's JSON to a folder that holds a weights file (any layout)."""
    meta = AdapterMeta(base_model=str(base), weights=weights, sha256=file_sha256(folder / weights), **extra)
    (folder / META_NAME).write_text(meta.to_json())
    return folder


@pytest.fixture(scope="module")
def layouts(peft_unet, tiny_pipe_dir, tmp_path_factory) -> dict[str, Path]:
    """The same adapter in diffusers layout (lorafleet's save) and PEFT's own (``PeftModel.save_pretrained``)."""
    root = tmp_path_factory.mktemp("layouts")
    diffusers = save_adapter(
        root / "diffusers", peft_unet.base_model.model, AdapterMeta(base_model=str(tiny_pipe_dir), rank=4, alpha=8.0)
    )
    peft_unet.save_pretrained(root / "peft")
    keys = list(load_file(str(root / "peft" / "adapter_model.safetensors")))
    assert keys and all(k.startswith("base_model.model.") and ".lora_" in k for k in keys), keys[:3]
    return {"diffusers": diffusers, "peft": lorafleet_folder(root / "peft", tiny_pipe_dir, "adapter_model.safetensors")}


def weights_of(folder: Path) -> tuple[dict, dict]:
    """A diffusers-layout adapter's tensors and its safetensors metadata (the LoraConfig diffusers saved)."""
    from safetensors import safe_open

    path = str(folder / "pytorch_lora_weights.safetensors")
    with safe_open(path, framework="pt") as f:
        return load_file(path), f.metadata()


def drawn_with(pipe, folder: Path, name: str) -> np.ndarray:
    load_adapter(pipe, folder, adapter_name=name)
    try:
        pipe.set_adapters(name)
        return images(pipe)
    finally:
        pipe.delete_adapters(name)


@pytest.fixture(scope="module")
def reference(pipe, layouts) -> np.ndarray:
    """What the adapter in diffusers layout draws (PROMPTS, seed 3, 4 steps)."""
    return drawn_with(pipe, layouts["diffusers"], "diffusers")


def test_a_peft_layout_adapter_draws_what_the_same_adapter_in_diffusers_layout_draws(pipe, layouts, reference):
    """Case 5: PEFT's base_model.model.… keys used to load 'fine' and draw exactly the base model (difference 0.00)."""
    base, diffusers = images(pipe), reference
    peft = drawn_with(pipe, layouts["peft"], "peft")
    assert np.abs(diffusers - base).mean() > 2.0  # the adapter really changes the images
    assert np.abs(peft - diffusers).max() <= 1.0, "PEFT layout must draw as the diffusers layout (≤ 1/255)"
    assert read_lora(layouts["peft"]).source_format == "peft"


def test_a_kohya_file_draws_what_the_diffusers_file_draws_alpha_included(
    pipe, layouts, reference, tmp_path, tiny_pipe_dir
):
    """Export to A1111/ComfyUI's layout keeps each module's alpha (8 here, rank 4: scale 2), not alpha = rank."""
    kohya = to_kohya(read_lora(layouts["diffusers"]))
    assert all(k.startswith("lora_unet_") for k in kohya), list(kohya)[:3]
    alphas = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas == {8.0}, alphas
    (tmp_path / "k").mkdir()
    save_file(kohya, str(tmp_path / "k" / "my_lora.safetensors"))
    folder = lorafleet_folder(tmp_path / "k", tiny_pipe_dir, "my_lora.safetensors")
    assert read_lora(folder / "my_lora.safetensors").source_format == "kohya"
    assert np.abs(drawn_with(pipe, folder, "kohya") - reference).max() <= 1.0


def test_a_file_that_matches_no_module_is_refused_naming_the_adapter_and_its_keys(pipe, tmp_path, tiny_pipe_dir):
    folder = tmp_path / "other-model"
    folder.mkdir()
    state = {
        "base_model.model.transformer.blocks.0.attn.qkv.lora_A.weight": torch.randn(4, 32),
        "base_model.model.transformer.blocks.0.attn.qkv.lora_B.weight": torch.randn(96, 4),
    }
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                            "target_modules": ["qkv"]}))  # fmt: skip
    lorafleet_folder(folder, tiny_pipe_dir, "adapter_model.safetensors")
    with pytest.raises(AdapterError) as info:
        load_adapter(pipe, folder, adapter_name="other")
    message = str(info.value)
    assert "'other-model'" in message and "no key matches a module of the base model" in message, message
    assert "base_model.model.transformer.blocks.0.attn.qkv.lora_A.weight" in message, message
    assert not any(injected(pipe, "other").values()) and "other" not in getattr(pipe.unet, "peft_config", {})


def test_a_partial_match_loads_and_warns_naming_the_unmatched_modules(
    pipe, layouts, reference, tmp_path, tiny_pipe_dir, caplog
):
    folder = tmp_path / "partial"
    folder.mkdir()
    state, metadata = weights_of(layouts["diffusers"])
    state["unet.extra_block.proj.lora.down.weight"] = torch.randn(4, 16)
    state["unet.extra_block.proj.lora.up.weight"] = torch.randn(16, 4)
    save_file(state, str(folder / "w.safetensors"), metadata)  # the LoraConfig (alpha 8) kept, as diffusers saves
    lorafleet_folder(folder, tiny_pipe_dir, "w.safetensors")
    with caplog.at_level(logging.WARNING, logger="training.lora_formats"):
        partial = drawn_with(pipe, folder, "partial")
    assert "unet.extra_block.proj" in caplog.text and "1 of" in caplog.text, caplog.text
    assert np.abs(partial - reference).max() <= 1.0  # the matching part applies


def test_an_adapter_that_changes_nothing_is_refused(pipe, layouts, tmp_path, tiny_pipe_dir):
    folder = tmp_path / "zeros"
    folder.mkdir()
    state, metadata = weights_of(layouts["diffusers"])
    zeros = {k: torch.zeros_like(v) if ".up." in k else v for k, v in state.items()}
    save_file(zeros, str(folder / "w.safetensors"), metadata)
    lorafleet_folder(folder, tiny_pipe_dir, "w.safetensors")
    with pytest.raises(AdapterError, match="every lora_B/lora_up weight is zero"):
        load_adapter(pipe, folder, adapter_name="zeros")
    assert "zeros" not in getattr(pipe.unet, "peft_config", {})


def test_pickled_and_unknown_files_are_refused_with_what_to_do(tmp_path):
    from training.lora_formats import LoraFormatError

    torch.save({"x": torch.zeros(1)}, tmp_path / "lora.ckpt")
    with pytest.raises(LoraFormatError, match="pickle files are not loaded.*save_file"):
        read_lora(tmp_path / "lora.ckpt")
    save_file({"model.diffusion_model.weight": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(LoraFormatError, match=r"model\.diffusion_model\.weight.*kohya/A1111"):
        read_lora(tmp_path / "w.safetensors")
