import json

import pytest
from diffusers import StableDiffusionPipeline
from transformers import CLIPModel, CLIPProcessor

TINY = [
    "clip.steps=3",
    "clip.hidden_size=32",
    "clip.layers=1",
    "clip.heads=2",
    "clip.pool_size=100",
    "vae.steps=3",
    "vae.pool_size=100",
    "vae.block_out_channels=[8, 16, 16, 16]",
    "unet.steps=3",
    "unet.block_out_channels=[16, 32]",
    "unet.attention_head_dim=4",
    "unet.pool_size=100",
]


@pytest.mark.slow
def test_build_command_writes_loadable_models(tmp_path, repo):
    from training.toy_world.__main__ import main

    stale = tmp_path / "toy-sd" / "stale.txt"
    stale.parent.mkdir()
    stale.write_text("from an older build")
    assert main(["build", "--config", str(repo / "configs" / "toy_world.yaml"), *TINY, f"out_dir={tmp_path}"]) == 0

    assert not stale.exists(), "a rebuild replaces the old folder whole"
    assert not list(tmp_path.glob(".*.tmp"))
    summary = json.loads((tmp_path / "toy-sd" / "toy_world_build.json").read_text())
    assert summary["config"]["unet"]["steps"] == 3 and summary["params_m"]["unet"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "toy-sd")
    pipe.set_progress_bar_config(disable=True)
    assert pipe(["a red circle"], num_inference_steps=1).images[0].size == (64, 64)
    CLIPModel.from_pretrained(tmp_path / "toy-clip")
    CLIPProcessor.from_pretrained(tmp_path / "toy-clip")


def test_build_rejects_bad_config_before_doing_anything(tmp_path, capsys, repo):
    from training.toy_world.__main__ import main

    assert (
        main(["build", "--config", str(repo / "configs" / "toy_world.yaml"), "unet.steps=0", f"out_dir={tmp_path}/x"])
        == 2
    )
    assert "unet.steps" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_build_is_deterministic_from_its_seed(tmp_path, repo):
    from safetensors.torch import load_file

    from training.toy_world.__main__ import main

    cfg = str(repo / "configs" / "toy_world.yaml")
    for name in ("a", "b"):
        assert main(["build", "--config", cfg, *TINY, f"out_dir={tmp_path / name}"]) == 0
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "a" / "toy-sd" / part), load_file(tmp_path / "b" / "toy-sd" / part)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), part
    a = load_file(tmp_path / "a" / "toy-clip" / "model.safetensors")
    b = load_file(tmp_path / "b" / "toy-clip" / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)
