"""Optimizers and learning-rate schedules for the LoRA parameters."""

from __future__ import annotations

import importlib.util

import torch
from diffusers.optimization import get_scheduler

from training.config import OptimArgs


class OptimizerUnavailable(RuntimeError):
    pass


def build_optimizer(params: list[torch.nn.Parameter], args: OptimArgs, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer``.

    ``adamw`` on CUDA is PyTorch's fused AdamW (``fused=True``: one kernel for all parameters instead of a
    per-tensor loop; it also takes fp16's ``GradScaler`` unscaling inside the kernel). On CPU it keeps PyTorch's
    default implementation.

    Raises:
        OptimizerUnavailable: adamw8bit without CUDA/bitsandbytes, or prodigy without prodigyopt.
    """
    name = args.optimizer
    if name == "adamw":
        fused = device.type == "cuda" or None  # None: PyTorch picks (foreach on CPU)
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    if name == "adamw8bit":
        if device.type != "cuda":
            raise OptimizerUnavailable(
                "optimizer 'adamw8bit' needs a CUDA GPU (bitsandbytes); on CPU use 'adamw' or 'prodigy' "
                "(config key train.optimizer)"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise OptimizerUnavailable(
                "optimizer 'adamw8bit' needs bitsandbytes: pip install 'lorafleet[gpu]' (config key train.optimizer)"
            )
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=args.lr, weight_decay=args.weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy estimates the step size itself; lr is a multiplier (~1.0) and d_coef scales the estimate
        return Prodigy(params, lr=args.lr, d_coef=args.d_coef, weight_decay=args.weight_decay, safeguard_warmup=True)
    raise OptimizerUnavailable(f"unknown train.optimizer {name!r}")


def build_scheduler(
    opt: torch.optim.Optimizer, args: OptimArgs, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' ``get_scheduler`` (the schedules its training scripts use), stepped once per optimizer step."""
    return get_scheduler(
        args.lr_scheduler, opt, num_warmup_steps=min(args.warmup_steps, total_steps), num_training_steps=total_steps
    )
