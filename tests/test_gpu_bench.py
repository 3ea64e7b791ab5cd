"""benchmarks/gpu_bench.py: the SD-1.5- and SDXL-scale benchmarks run at --tiny size on CPU (so they cannot rot),
write every arm's figures, and never import Ray or MLflow (GPU machines have neither)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks._gpu_measure import peak_flops
from benchmarks._sd_scale import SD15, SDXL, TINY, TINY_SDXL, build_pipeline, check_param_counts, meta_param_counts


def test_sd15_architecture_has_sd15_parameter_counts():
    counts = meta_param_counts(SD15)  # meta device: no memory, no time
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    check_param_counts(counts, SD15)
    assert sum(meta_param_counts(TINY).values()) < 10_000_000


def test_sdxl_architecture_has_sdxl_base_parameter_counts():
    counts = meta_param_counts(SDXL)  # stabilityai/stable-diffusion-xl-base-1.0's four networks
    assert counts == {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }
    check_param_counts(counts, SDXL)
    with pytest.raises(ValueError, match="sdxl is not SDXL base's architecture: text_encoder_2: 0 parameters"):
        check_param_counts({k: v for k, v in counts.items() if k != "text_encoder_2"}, SDXL)
    assert sum(meta_param_counts(TINY_SDXL).values()) < 10_000_000


def test_tiny_sdxl_is_an_sdxl_pipeline_that_draws():
    from training.families import family_for

    pipe = build_pipeline(TINY_SDXL)
    assert family_for(pipe).name == "sdxl" and pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == 128  # both encoders' widths, concatenated
    image = pipe("a photo of sks", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_param_check_refuses_another_architecture():
    counts = meta_param_counts(SD15) | {"unet": 700_000_000}
    with pytest.raises(ValueError, match="unet: 700,000,000 parameters, expected 859,520,964"):
        check_param_counts(counts, SD15)


@pytest.mark.parametrize(
    "name, precision, tflops",
    [
        ("NVIDIA H200", "bf16", 989.5),
        ("NVIDIA H200 NVL", "bf16", 835.5),
        ("NVIDIA H100 80GB HBM3", "bf16", 989.5),
        ("NVIDIA H100 PCIe", "fp16", 756.5),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("Tesla T4", "fp16", 65.0),
        ("Tesla T4", "bf16", None),  # Turing has no bf16 tensor cores
        ("NVIDIA GeForce RTX 4090", "bf16", None),  # not in the table: MFU n/a, never a guess
    ],
)
def test_peak_flops_table(name, precision, tflops):
    assert peak_flops(name, precision) == (tflops * 1e12 if tflops else None)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_tiny_run_writes_every_arm_without_ray_or_mlflow(repo, tmp_path, arch):
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1")
    # one torch thread: on a shared, busy CPU OpenMP's threads wait on each other (measured 30x slower with 2)
    cmd = [
        sys.executable,
        "benchmarks/gpu_bench.py",
        "--tiny",
        "--arch",
        arch,
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads((tmp_path / "gpu_bench.json").read_text())

    assert not {"ray", "mlflow"} & set(result["loaded_modules"])
    assert "torch" in result["loaded_modules"] and "serving" in result["loaded_modules"]  # the list is real
    assert (tmp_path / "gpu_bench.png").stat().st_size > 10_000

    def positive(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x) and x > 0

    train = {a["name"]: a for a in result["train"]}
    assert set(train) == {
        f"fp32/{s}/{c}/b{b}" for s in ("cached", "encode") for c in ("ckpt", "no-ckpt") for b in (1, 2)
    }
    for arm in train.values():
        assert "error" not in arm, arm
        assert len(arm["rounds"]) == 2  # every arm in every round
        for key in ("images_per_s", "steps_per_s", "peak_memory_bytes", "flops_per_step"):
            assert positive(arm[key]), (arm["name"], key, arm[key])
        assert arm["images_per_s"] == pytest.approx(arm["steps_per_s"] * arm["batch_size"])
        assert arm["mfu"] is None  # CPU: n/a
    # the encoders' FLOPs are counted in the encode-every-step arms
    assert train["fp32/encode/no-ckpt/b2"]["flops_per_step"] > train["fp32/cached/no-ckpt/b2"]["flops_per_step"]

    serve = {a["name"]: a for a in result["serve"]}
    assert set(serve) == {"base/b1", "single/b1", "base/b4", "single/b4", "mixed/b4", "separate/b4"}
    for arm in serve.values():
        assert len(arm["seconds"]) == 2
        assert positive(arm["images_per_s"]) and positive(arm["p50_latency_s"]), arm
    for key in ("cached_over_encode", "ckpt_speed", "single_over_base", "mixed_over_single", "mixed_over_separate"):
        assert result["ratios"][key] and all(positive(v) for v in result["ratios"][key].values()), key
    assert result["ratios"]["ckpt_memory"] == {}  # CPU: peak memory is the whole process's RSS, no ratio
    assert result["params"]["unet"] < 10_000_000 and result["device"]["type"] == "cpu"
    assert result["scale"] == {"sd15": "tiny", "sdxl": "tiny-sdxl"}[arch] and result["arch"] == arch
    assert ("text_encoder_2" in result["params"]) == (arch == "sdxl")
    # --plot redraws a JSON next to it (a copy from a GPU machine), not into the default folder
    copy = tmp_path / "copied" / "gpu_bench.json"
    copy.parent.mkdir()
    copy.write_text((tmp_path / "gpu_bench.json").read_text())
    redraw = subprocess.run(
        [*cmd[:2], "--plot", str(copy)], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert redraw.returncode == 0 and (copy.parent / "gpu_bench.png").is_file(), redraw.stdout + redraw.stderr
    assert f"wrote {copy.parent / 'gpu_bench.png'}" in redraw.stdout
    assert "training fp32: round 2/2 done" in proc.stdout and "mixed_over_single" in proc.stdout
