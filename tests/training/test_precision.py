"""Every dtype decision (training.precision) on CPU, fp16's loss-scaling path, and validation images whose VAE
dtype differs from the pipeline's latents (the class of bug that broke fp16 training with validation prompts)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from training.config import TrainConfig
from training.data import validate_dataset
from training.dataset import make_source
from training.loop import make_state, optimizer_step, train_loop
from training.optim import build_optimizer
from training.precision import (
    Precision,
    PrecisionError,
    cast_latents_at_decode,
    inference_precision,
    resolve_precision,
    set_matmul_precision,
)
from training.worker import (
    WorkerSpec,
    adapter_meta,
    build_worker_parts,
    read_checkpoint,
    run_worker,
    validation_grid,
    write_checkpoint,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a CUDA *device object* needs no GPU to ask about
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _spec(cfg: TrainConfig) -> WorkerSpec:
    report = validate_dataset(cfg.data)
    report.raise_if_errors()
    return WorkerSpec(cfg, report.examples, report.fingerprint())


# (choice, device, native bf16, VAE force_upcast) -> (resolved, weights, VAE, autocast, GradScaler)
TABLE = [
    ("auto", CPU, False, True, ("no", F32, F32, None, False)),
    ("no", CPU, True, True, ("no", F32, F32, None, False)),
    ("auto", CUDA, True, True, ("bf16", BF16, BF16, BF16, False)),
    ("auto", CUDA, False, True, ("fp16", F16, F32, F16, True)),  # T4/V100: fp16 + loss scaling
    ("fp16", CUDA, True, True, ("fp16", F16, F32, F16, True)),  # force_upcast: the VAE stays fp32
    ("fp16", CUDA, True, False, ("fp16", F16, F16, F16, True)),  # an fp16-safe VAE (force_upcast=false)
    ("bf16", CUDA, True, True, ("bf16", BF16, BF16, BF16, False)),  # bf16 has fp32's range: no upcast, no scaler
    ("no", CUDA, True, True, ("no", F32, F32, None, False)),
    ("no", CUDA, False, False, ("no", F32, F32, None, False)),
]


@pytest.mark.parametrize("choice, device, bf16, upcast, expected", TABLE)
def test_every_dtype_decision(choice, device, bf16, upcast, expected):
    p = resolve_precision(choice, device, vae_force_upcast=upcast, bf16_supported=bf16)
    got = (p.mixed_precision, p.weight_dtype, p.vae_dtype, p.autocast_dtype, p.use_grad_scaler)
    assert got == expected
    assert p.device_type == device.type


def test_auto_asks_torch_for_native_bf16(monkeypatch):
    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    native = True
    assert resolve_precision("auto", CUDA).mixed_precision == "bf16"
    native = False  # e.g. a V100: bf16 only emulated
    assert resolve_precision("auto", CUDA).mixed_precision == "fp16"
    assert asked == [False, False]  # emulated bf16 does not count


@pytest.mark.parametrize("choice", ["fp16", "bf16"])
@pytest.mark.parametrize("device", [CPU, torch.device("mps")])
def test_half_precision_off_cuda_names_the_key_and_the_fix(choice, device):
    with pytest.raises(PrecisionError) as err:
        resolve_precision(choice, device)
    text = str(err.value)
    assert f"train.mixed_precision={choice} needs a CUDA GPU" in text and device.type in text
    assert "train.mixed_precision=auto" in text and "device='cuda'" in text


def test_bf16_on_a_gpu_without_it_says_use_fp16():
    with pytest.raises(PrecisionError, match=r"train.mixed_precision=bf16: this GPU has no native bf16.*=fp16"):
        resolve_precision("bf16", CUDA, bf16_supported=False)


def test_precision_is_frozen_and_its_helpers_follow_it():
    p = resolve_precision("fp16", CUDA, bf16_supported=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.vae_dtype = torch.float16  # type: ignore[misc]
    fp32 = Precision()
    assert not fp32.grad_scaler().is_enabled()
    x = torch.randn(4, 4)
    with fp32.autocast():
        assert (x @ x).dtype == F32
    cpu_bf16 = dataclasses.replace(fp32, autocast_dtype=BF16)  # CPU autocast exists in bf16: the context engages
    with cpu_bf16.autocast():
        assert (x @ x).dtype == BF16
    assert dataclasses.replace(fp32, use_grad_scaler=True).grad_scaler().is_enabled()
    assert inference_precision(F16, F16, CPU) == Precision("fp16", "cpu", F16, F16, F16, False)
    assert inference_precision(F32, F32, CPU) == Precision()


def test_the_ray_free_worker_takes_half_precision_without_the_ray_section(train_config):
    cfg = train_config(**{"train.mixed_precision": "fp16"})  # ray.use_gpu stays false: validation accepts it
    assert cfg.train.mixed_precision == "fp16"
    assert TrainConfig.config_problems(cfg.model_dump()) == []
    # the Ray path still refuses it: its workers are CPU ones without ray.use_gpu
    (problem,) = TrainConfig.ray_problems(cfg.model_dump())
    assert "train.mixed_precision: fp16 needs GPU workers; set ray.use_gpu=true" in problem
    assert problem in TrainConfig.combination_problems(cfg.model_dump())
    gpu = cfg.model_dump() | {"ray": cfg.ray.model_dump() | {"use_gpu": True}}
    assert TrainConfig.ray_problems(gpu) == []
    assert TrainConfig.ray_problems(cfg.model_dump(), prefix="trial.")[0].startswith("trial.train.mixed_precision")
    # and on a CPU device the worker itself says what to do, before loading anything
    with pytest.raises(PrecisionError, match="train.mixed_precision=fp16 needs a CUDA GPU; this worker runs on cpu"):
        run_worker(_spec(cfg))


def test_training_entry_refuses_half_precision_on_cpu_workers(train_config):
    from training.train import preflight

    problems = preflight(train_config(**{"train.mixed_precision": "bf16"}), resume=False)
    assert any("train.mixed_precision: bf16 needs GPU workers" in p for p in problems), problems
    assert not preflight(train_config(**{"train.mixed_precision": "bf16", "ray.use_gpu": True}), resume=False)


def test_adamw_is_fused_on_cuda_only(train_config):
    args = train_config().train
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert build_optimizer(params, args, CUDA).defaults["fused"] is True  # CPU tensors: fused AdamW runs there too
    assert not build_optimizer(params, args, CPU).defaults["fused"]


def test_tf32_is_set_on_cuda_only():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        set_matmul_precision(CPU, allow_tf32=True)
        assert torch.get_float32_matmul_precision() == "highest"
        set_matmul_precision(CUDA, allow_tf32=True)
        assert torch.get_float32_matmul_precision() == "high"
        set_matmul_precision(CUDA, allow_tf32=False)
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
    assert TrainConfig.model_fields["train"].default_factory().allow_tf32 is True


def test_vae_decodes_latents_of_another_dtype(tiny_pipe):
    vae = tiny_pipe.vae
    try:
        vae.to(torch.float64)
        latents = torch.randn(1, vae.config.latent_channels, 8, 8)  # fp32, as the pipeline would make them
        with pytest.raises(RuntimeError, match="type"):  # the bug's class: input and bias dtypes differ
            vae.decode(latents)
        handles = cast_latents_at_decode(vae)
        assert vae.decode(latents).sample.dtype == torch.float64
        for h in handles:
            h.remove()
    finally:
        vae.to(torch.float32)


def test_validation_grid_draws_with_a_vae_in_another_dtype(train_config):
    """On CUDA under fp16 the VAE is fp32 and the latents fp16; here the VAE is float64 and the latents fp32 —
    the same mismatch on CPU. Before the fix this failed in vae.decode (``Input type ... and bias type``)."""
    cfg = train_config(**{"validation.prompts": "[a red circle on a white background, sks]", "validation.steps": 3})
    parts = build_worker_parts(cfg, CPU)
    same = np.asarray(validation_grid(parts, cfg), dtype=np.int16)
    parts.vae.to(torch.float64)
    other = np.asarray(validation_grid(parts, cfg), dtype=np.int16)
    assert other.shape == same.shape == (64, 128, 3)
    assert np.abs(other - same).max() <= 1  # within 1/255: the same image, decoded in float64
    assert parts.raw_unet.training is False  # restored as it was


def _train(cfg, parts, scaler_on: bool, epochs: int = 3):
    parts.precision = dataclasses.replace(parts.precision, use_grad_scaler=scaler_on)  # GradScaler("cpu") works
    source = make_source(_spec(cfg).examples, cfg.data, parts, True)
    state = make_state(cfg, parts, source.batches_per_epoch(cfg.train.batch_size))
    metrics = []
    train_loop(cfg, parts, source, state, report=lambda m, s: metrics.append(m))
    return state, metrics


@pytest.mark.slow
def test_loss_scaling_unscales_before_clipping_and_matches_unscaled_fp32(train_config):
    """In fp32 nothing underflows, so scaling by 2**16 and unscaling before the clip must give the unscaled run's
    weights; clipping the scaled gradients (norm ~65,536× too big) would not."""
    cfg = train_config(**{"train.epochs": 1, "train.max_grad_norm": 0.01})
    parts = build_worker_parts(cfg, CPU)
    start = [p.detach().clone() for p in parts.trainable]
    runs = {}
    for on in (False, True):
        with torch.no_grad():
            for p, p0 in zip(parts.trainable, start):
                p.copy_(p0)
        state, metrics = _train(cfg, parts, scaler_on=on)
        runs[on] = ([p.detach().clone() for p in parts.trainable], state, metrics)
    (plain, _, m_plain), (scaled, state, m_scaled) = runs[False], runs[True]
    assert state.step == 2 and state.scaler.is_enabled() and state.skipped_steps == 0
    assert state.scaler.get_scale() == 2.0**16 and m_scaled[-1]["grad_scale"] == 2.0**16
    assert m_scaled[-1]["skipped_steps"] == 0 and "grad_scale" not in m_plain[-1]
    assert all(np.isfinite(m["loss"]) for m in m_scaled)
    assert any(not torch.equal(a, b) for a, b in zip(start, scaled))  # it trained
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_an_inf_gradient_skips_the_step_backs_off_and_round_trips(train_config, tmp_path):
    cfg = train_config()
    parts = build_worker_parts(cfg, CPU)
    parts.precision = dataclasses.replace(parts.precision, use_grad_scaler=True)
    state = make_state(cfg, parts, 2)
    param = parts.trainable[0]
    before, lr_epoch = param.detach().clone(), state.scheduler.last_epoch
    state.scaler.scale(sum((p * 0).sum() for p in parts.trainable)).backward()  # zero gradients, as the loop does
    param.grad.view(-1)[0] = float("inf")
    assert optimizer_step(state, parts.trainable, max_grad_norm=1.0) is False
    assert torch.equal(param, before)  # skipped
    assert state.scaler.get_scale() == 2.0**15 and state.skipped_steps == 1 and state.step == 1
    assert state.scheduler.last_epoch == lr_epoch  # a skipped step does not advance the schedule
    state.scaler.scale(sum((p * 1e-3).sum() for p in parts.trainable)).backward()  # finite: this one steps
    assert optimizer_step(state, parts.trainable, max_grad_norm=1.0) is True
    assert not torch.equal(param, before) and state.scheduler.last_epoch == lr_epoch + 1

    # the checkpoint's trainer state carries the scaler (weights_only torch.load: plain values only)
    ckpt = write_checkpoint(tmp_path / "ckpt", parts, state, adapter_meta(_spec(cfg), state))
    fresh = build_worker_parts(cfg, CPU)
    fresh.precision = parts.precision
    resumed = make_state(cfg, fresh, 2)
    assert resumed.scaler.get_scale() == 2.0**16
    read_checkpoint(ckpt, fresh, resumed)
    assert resumed.scaler.state_dict() == state.scaler.state_dict()
    assert (resumed.skipped_steps, resumed.step) == (1, 2)
    for a, b in zip(parts.trainable, fresh.trainable):
        torch.testing.assert_close(a, b)


def test_a_checkpoint_without_scaler_state_still_resumes(train_config):
    cfg = train_config()
    parts = build_worker_parts(cfg, CPU)
    old = make_state(cfg, parts, 2).state_dict()
    del old["scaler"], old["skipped_steps"]  # written before loss scaling existed
    parts.precision = dataclasses.replace(parts.precision, use_grad_scaler=True)
    state = make_state(cfg, parts, 2)
    state.load_state_dict(old)
    assert state.scaler.get_scale() == 2.0**16 and state.skipped_steps == 0
