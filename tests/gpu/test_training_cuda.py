"""Training on CUDA per precision (training.precision), plain PyTorch only: no Ray, no MLflow (the GPU machine has
neither; tests/gpu/test_imports.py checks). Skipped without CUDA (tests/conftest.py).

    python -m pytest -q tests/gpu -m gpu
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from diffusers import StableDiffusionPipeline
from PIL import Image

from training.config import TrainConfig
from training.data import validate_dataset
from training.dataset import make_source
from training.loop import make_state, optimizer_step, train_loop
from training.sampling import generate
from training.tracking import NullTracker
from training.worker import ADAPTER_DIR, WorkerSpec, build_worker_parts, run_worker, sample_path

PROMPTS = ["a red circle on a white background", "a blue square on a black background, sks"]
EXPECTED = {  # train.mixed_precision -> (weights, VAE, loss scaling); the toy VAE says force_upcast
    "fp16": (torch.float16, torch.float32, True),
    "bf16": (torch.bfloat16, torch.bfloat16, False),
    "no": (torch.float32, torch.float32, False),
}


class Recorder(NullTracker):
    """Keeps what the worker logs."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.images: dict[str, Image.Image] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append(dict(metrics, step=step))

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        self.images[artifact_file] = image


def _spec(cfg: TrainConfig) -> WorkerSpec:
    report = validate_dataset(cfg.data)
    report.raise_if_errors()
    return WorkerSpec(cfg, report.examples, report.fingerprint())


def _cuda_config(train_config, precision: str, **more):
    prompts = json.dumps(PROMPTS)  # a YAML flow list; quoted, so the commas inside a prompt stay there
    values = {"train.mixed_precision": precision, "validation.prompts": prompts, "validation.every_n_epochs": 1}
    return train_config(**{"validation.steps": 5, **values, **more})


def _train_on_cuda(cfg: TrainConfig, keep: Path):
    """run_worker on cuda; the final checkpoint's adapter is copied to ``keep`` (the sink's folder is temporary)."""
    tracker, reports = Recorder(), []

    def sink(metrics, ckpt):
        reports.append(metrics)
        if ckpt is not None:
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(ckpt / ADAPTER_DIR, keep)

    parts, state = run_worker(_spec(cfg), device="cuda", sink=sink, tracker=tracker)
    return parts, state, tracker, reports


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16", "no"])
def test_a_training_run_per_precision_draws_and_saves(train_config, tmp_path, precision):
    cfg = _cuda_config(train_config, precision)  # no ray.use_gpu: the device decides
    parts, state, tracker, reports = _train_on_cuda(cfg, tmp_path / "adapter")
    weights, vae, scaled = EXPECTED[precision]
    assert (parts.precision.weight_dtype, parts.vae.dtype, state.scaler.is_enabled()) == (weights, vae, scaled)
    assert parts.raw_unet.conv_in.weight.dtype == weights and all(p.dtype == torch.float32 for p in parts.trainable)
    assert len(reports) == cfg.train.epochs and all(np.isfinite(r["loss"]) for r in reports)
    assert sorted(tracker.images) == [sample_path(e) for e in range(cfg.train.epochs + 1)]  # before + each epoch
    for name, grid in tracker.images.items():
        pixels = np.asarray(grid, dtype=np.float32)
        assert pixels.shape == (64, 128, 3) and pixels.std() > 5, name  # drawn, not a black (NaN) or flat grid
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    b = [p for n, p in parts.raw_unet.named_parameters() if "lora_B" in n]
    assert b and all(torch.isfinite(p).all() for p in b) and any(p.abs().sum() > 0 for p in b)  # it trained
    if scaled:
        assert "grad_scale" in reports[-1] and reports[-1]["skipped_steps"] == state.skipped_steps


@pytest.mark.gpu
def test_grad_scaler_scales_fp16_and_updates(train_config):
    cfg = train_config(**{"train.mixed_precision": "fp16", "train.epochs": 2})
    parts = build_worker_parts(cfg, torch.device("cuda"))
    source = make_source(_spec(cfg).examples, cfg.data, parts, True)
    state = make_state(cfg, parts, source.batches_per_epoch(cfg.train.batch_size))
    assert state.scaler.is_enabled() and state.scaler.get_scale() == 2.0**16
    state.scaler = torch.amp.GradScaler("cuda", growth_interval=1)  # grows after every clean step: observable
    train_loop(cfg, parts, source, state, report=lambda m, s: None)
    clean = state.step - state.skipped_steps
    assert clean > 0 and state.scaler.get_scale() > 1
    assert state.scaler.get_scale() == 2.0 ** (16 + clean - state.skipped_steps)  # ×2 per clean, ½ per skip
    # an overflow in fp16 gradients: the step is skipped, the weights stay, the scale halves
    lora = parts.trainable[0]
    before, scale = lora.detach().clone(), state.scaler.get_scale()
    state.scaler.scale(sum((p * 0).sum() for p in parts.trainable)).backward()
    lora.grad.view(-1)[0] = float("inf")
    assert optimizer_step(state, parts.trainable, cfg.train.max_grad_norm) is False
    assert torch.equal(lora, before) and state.scaler.get_scale() == scale / 2


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_saved_adapter_draws_the_same_in_plain_diffusers(train_config, tmp_path, precision):
    """fp16 is left out: diffusers' SD 1.x pipeline does not cast latents to an fp32 VAE (the bug lorafleet's
    training pipeline fixes with a decode-boundary cast), so a plain fp16 pipeline must hold an fp16 VAE and then
    draws with another VAE than training's."""
    cfg = _cuda_config(train_config, precision, **{"train.epochs": 4, "train.lr": 5e-3})
    parts, _, _, _ = _train_on_cuda(cfg, tmp_path / "adapter")
    in_memory = generate(parts.pipe, PROMPTS, seed=3, steps=5, guidance=4.0)
    pipe = StableDiffusionPipeline.from_pretrained(cfg.base_model, dtype=parts.precision.weight_dtype).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    base = generate(pipe, PROMPTS, seed=3, steps=5, guidance=4.0)
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    # diffusers loads LoRA weights in the pipeline's dtype; training keeps them fp32 (cast_training_params): compare
    # the same arithmetic, so a difference means the saved values differ
    for name, p in pipe.unet.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    loaded = generate(pipe, PROMPTS, seed=3, steps=5, guidance=4.0)
    for a, b, c in zip(in_memory, loaded, base):
        a, b, c = (np.asarray(x, dtype=np.int16) for x in (a, b, c))
        assert np.abs(a - b).max() <= 1  # within 1/255
        assert np.abs(a - c).max() > 1  # the adapter changes the drawing: the comparison can fail


def _ddp_rank(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        reports = []
        parts, state = run_worker(
            WorkerSpec.from_dict(spec),
            device=f"cuda:{rank}",
            rank=rank,
            world_size=world,
            prepare=lambda m: DDP(m, device_ids=[rank]),
            sink=lambda metrics, ckpt: reports.append(metrics),
        )
        lora = {n: p.detach().cpu() for n, p in parts.raw_unet.named_parameters() if p.requires_grad}
        torch.save({"lora": lora, "loss": [r["loss"] for r in reports], "step": state.step}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_worker_nccl_ddp_step(train_config, tmp_path):
    cfg = train_config(**{"train.mixed_precision": "bf16", "train.epochs": 1, "ray.num_workers": 2})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, _spec(cfg).to_dict(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] > 0 and r0["loss"] == r1["loss"]  # the loss is averaged over ranks
    assert all(np.isfinite(r0["loss"]))
    for name, p in r0["lora"].items():
        assert torch.equal(p, r1["lora"][name]), name  # DDP kept the replicas identical
    assert any(p.abs().sum() > 0 for n, p in r0["lora"].items() if "lora_B" in n)  # and they trained
