"""Bring your own LoRA: an adapter trained elsewhere (here: exported to kohya/A1111's layout) is imported, registered
with source=imported, served by its name and in mixed batches next to trained ones, and exports back unchanged;
diffusers -> kohya -> diffusers draws the same images."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from evaluation.adapter_io import main_export, main_import
from serving.engine import Engine, ImageRequest
from training.adapter import AdapterMeta, save_adapter, verify_adapter

PROMPT = "a red circle on a sks background"


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def scaled_adapter(tiny_pipe, tiny_pipe_dir, tmp_path_factory) -> Path:
    """A random LoRA with alpha 8 on rank 4 (scale 2: an export that wrote alpha = rank would draw otherwise)."""
    from peft import LoraConfig

    unet = copy.deepcopy(tiny_pipe.unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))  # fmt: skip
    gen = torch.Generator().manual_seed(11)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.3
    meta = AdapterMeta(base_model=str(tiny_pipe_dir), rank=4, alpha=8.0, trigger="sks")
    return save_adapter(tmp_path_factory.mktemp("scaled") / "diffusers", unet, meta)


@pytest.fixture(scope="module")
def kohya_file(scaled_adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kohya") / "my_style.safetensors"
    assert main_export([str(scaled_adapter), str(out), "--format", "kohya"]) == 0
    return out


def test_diffusers_kohya_diffusers_round_trip_draws_the_same_images(
    serve_args, scaled_adapter, kohya_file, tiny_pipe_dir, tmp_path
):
    keys = load_file(str(kohya_file))
    assert all(k.startswith("lora_unet_") for k in keys) and {float(v) for k, v in keys.items()
                                                              if k.endswith(".alpha")} == {8.0}  # fmt: skip
    out = tmp_path / "imported"
    args = [str(kohya_file), "--name", "my-style", "--base-model", str(tiny_pipe_dir), "--out", str(out)]
    assert main_import([*args, "--trigger", "ohwx", "--no-register"]) == 0
    meta = verify_adapter(out)
    assert (meta.source, meta.source_format, meta.rank, meta.alpha, meta.trigger) == (
        "imported",
        "kohya",
        4,
        8.0,
        "ohwx",
    )
    assert meta.training["imported_from"] == "my_style.safetensors"
    engine = Engine.from_args(serve_args(**{"adapters.original": str(scaled_adapter), "adapters.imported": str(out)}))
    drawn = {m: engine.generate([engine.prepare(ImageRequest(PROMPT, model=m, seed=5))])[0]
             for m in ("original", "imported", "base")}  # fmt: skip
    original, imported, base = (pixels(drawn[m].images[0]) for m in ("original", "imported", "base"))
    assert np.abs(original - base).mean() > 2  # the adapter changes the images
    assert np.abs(imported - original).max() <= 1, "diffusers -> kohya -> diffusers must draw the same (≤ 1/255)"


def test_an_import_that_does_not_fit_names_the_keys_and_shapes_and_writes_nothing(
    kohya_file, tiny_pipe_dir, tmp_path, capsys
):
    state = load_file(str(kohya_file))
    key = sorted(k for k in state if k.endswith(".lora_down.weight"))[0]
    state[key] = torch.randn(4, 99)  # a model 99 wide
    save_file(state, str(tmp_path / "other.safetensors"))
    out = tmp_path / "never"
    args = [str(tmp_path / "other.safetensors"), "--name", "x", "--base-model", str(tiny_pipe_dir), "--out", str(out)]
    assert main_import([*args, "--no-register"]) == 2
    err = capsys.readouterr().err
    assert "do not fit base model shapes" in err and "[4, 99]" in err, err
    assert not out.exists() or not any(out.iterdir())


def test_an_imported_adapter_is_registered_served_by_name_and_batched_with_trained_ones(
    serve_args, kohya_file, tiny_pipe_dir, mlflow_server, tmp_path
):
    from evaluation.registry import TAG_SOURCE, client_for

    folder = tmp_path / "imp"
    args = [str(kohya_file), "--name", "imp-style", "--base-model", str(tiny_pipe_dir), "--out", str(folder)]
    assert main_import([*args, "--tracking-uri", mlflow_server]) == 0
    version = client_for(mlflow_server).get_model_version_by_alias("imp-style", "champion")
    assert version.tags[TAG_SOURCE] == "imported" and version.tags["adapter_sha256"] == verify_adapter(folder).sha256

    engine = Engine.from_args(serve_args(tracking_uri=mlflow_server))
    engine.resolver.refresh()  # as a replica does at start
    assert "imp-style" in {e.id for e in engine.resolver.catalog.entries()}  # GET /v1/models lists it
    reqs = [ImageRequest(PROMPT, model=m, seed=20 + i) for i, m in enumerate(["imp-style", "ad0", "base", "imp-style"])]
    mixed = engine.generate([engine.prepare(r) for r in reqs])
    assert len({r.pass_id for r in mixed}) == 1, "one UNet pass for imported, trained and base"
    for req, got in zip(reqs, mixed):
        [alone] = engine.generate([engine.prepare(req)])
        assert np.abs(pixels(got.images[0]) - pixels(alone.images[0])).max() <= 1, req.model
    assert mixed[0].version == str(version.version)

    again = tmp_path / "again.safetensors"  # export by registry name: the kohya file it came from, unchanged
    assert main_export(["imp-style@champion", str(again), "--tracking-uri", mlflow_server]) == 0
    before, after = load_file(str(kohya_file)), load_file(str(again))
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k].float(), after[k].float(), atol=1e-6) for k in before)
