"""Optimizers, schedules and the checks that run before any work starts."""

from __future__ import annotations

import pytest
import torch

from training.config import OptimArgs, PreflightError
from training.optim import OptimizerUnavailable, build_optimizer, build_scheduler
from training.train import preflight

CPU = torch.device("cpu")


def _fit(args: OptimArgs, steps: int = 60) -> tuple[float, float]:
    """Loss before/after fitting a tiny least-squares problem with this optimizer."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(8))
    x, target = torch.randn(32, 8), torch.randn(8)
    y = x @ target
    opt = build_optimizer([w], args, CPU)
    sched = build_scheduler(opt, args, steps)
    loss = lambda: ((x @ w - y) ** 2).mean()  # noqa: E731
    start = loss().item()
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
        sched.step()
    return start, loss().item()


@pytest.mark.parametrize(
    "args",
    [
        OptimArgs(optimizer="adamw", lr=5e-2, weight_decay=0),
        OptimArgs(optimizer="sgd", lr=1e-2, weight_decay=0),
        OptimArgs(optimizer="prodigy", lr=1.0, weight_decay=0),
    ],
    ids=lambda a: a.optimizer,
)
def test_each_cpu_optimizer_reduces_the_loss(args):
    start, end = _fit(args)
    assert end < 0.5 * start


def test_adamw8bit_on_cpu_says_what_to_do():
    with pytest.raises(OptimizerUnavailable, match="needs a CUDA GPU.*train.optimizer"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimArgs(optimizer="adamw8bit"), CPU)


@pytest.mark.parametrize("schedule", ["constant_with_warmup", "linear", "cosine"])
def test_warmup_ramps_the_learning_rate(schedule):
    args = OptimArgs(lr=1.0, lr_scheduler=schedule, warmup_steps=4)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], args, CPU)
    sched = build_scheduler(opt, args, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and lrs[1] < lrs[2] < lrs[3] < lrs[4] == pytest.approx(1.0)
    if schedule != "constant_with_warmup":
        assert lrs[-1] < 0.3


def test_preflight_lists_gpu_only_choices_on_cpu(train_config):
    with pytest.raises(ValueError, match="adamw8bit' needs a CUDA GPU") as refused:
        train_config(**{"train.optimizer": "adamw8bit", "train.mixed_precision": "bf16"})  # refused when validated
    assert "mixed_precision" not in str(refused.value)  # the device decides that one (training.precision)
    gpu = train_config(**{"train.optimizer": "adamw8bit", "train.mixed_precision": "bf16", "ray.use_gpu": True})
    cfg = gpu.model_copy(update={"ray": gpu.ray.model_copy(update={"use_gpu": False})})  # changed after validation
    problems = preflight(cfg, resume=False)
    assert len(problems) == 2
    assert "adamw8bit" in problems[0] and "train.mixed_precision: bf16" in problems[1]
    assert issubclass(PreflightError, ValueError)
