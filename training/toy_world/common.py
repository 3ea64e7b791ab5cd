"""Helpers shared by the toy-world trainers: seeding, image tensors, LR schedule, progress."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the range diffusers' VAEs use."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` random index batches over ``range(n)``, drawn from ``gen``."""
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=gen)


def make_optimizer(
    params: Iterable[torch.nn.Parameter], lr: float, steps: int, warmup: int = 100
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warmup then cosine decay (the usual recipe for small from-scratch models)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=2.0)


def optimizer_step(
    loss: torch.Tensor,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    losses: list[float],
    bar: tqdm,
) -> None:
    """Backward, clip to norm 1, step optimizer and schedule; record the loss and show its running mean."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    losses.append(loss.item())
    bar.update()
    bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
