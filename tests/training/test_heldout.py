"""The held-out denoising loss: fixed problems, comparable across calls, ranks and adapters."""

from __future__ import annotations

import pytest
import torch

from training.config import PreflightError
from training.data import validate_dataset
from training.heldout import HeldOut, fixed_timesteps, select_heldout, split_holdout
from training.worker import build_worker_parts


def test_split_holdout_is_disjoint_spread_and_deterministic(toy_dataset, train_config):
    examples = validate_dataset(train_config().data).examples
    train, held = split_holdout(examples, 3)
    assert len(held) == 3 and len(train) == len(examples) - 3
    assert not {e.path for e in train} & {e.path for e in held}
    assert [e.path.name for e in held] == ["0000.png", "0003.png", "0005.png"]  # spread, not the last three
    assert split_holdout(examples, 3) == (train, held)
    assert split_holdout(examples, 0) == (examples, [])
    with pytest.raises(PreflightError, match="validation.holdout=8"):
        split_holdout(examples, len(examples))


def test_select_heldout_reads_a_folder_and_names_its_problems(toy_dataset, train_config, tmp_path):
    cfg = train_config(**{"validation.data_path": str(toy_dataset / "heldout")})
    train, held = select_heldout(cfg, validate_dataset(cfg.data).examples)
    assert len(train) == 8 and len(held) == 8 and all("sks" in e.caption for e in held)
    with pytest.raises(ValueError, match="not a folder"):
        select_heldout(train_config(**{"validation.data_path": str(tmp_path / "nope")}), train)
    with pytest.raises(ValueError, match="alternatives"):
        train_config(**{"validation.data_path": str(toy_dataset / "heldout"), "validation.holdout": 2})


def test_fixed_timesteps_cover_the_schedule():
    t = fixed_timesteps(1000, 8)
    assert t.tolist() == [62, 187, 312, 437, 562, 687, 812, 937]


@pytest.fixture
def parts_and_held(train_config):
    cfg = train_config(**{"validation.holdout": 3, "validation.loss_timesteps": 4, "lora.dropout": 0.5})
    examples = validate_dataset(cfg.data).examples
    _, held = split_holdout(examples, 3)
    parts = build_worker_parts(cfg, torch.device("cpu"))
    return cfg, parts, held


def test_val_loss_is_fixed_across_calls_and_modes_and_splits_over_ranks(parts_and_held):
    cfg, parts, held = parts_and_held
    h = HeldOut(held, cfg, parts)
    parts.raw_unet.train()  # dropout 0.5 on the LoRA branch must not leak into the metric
    first, second = h.loss(parts), h.loss(parts)
    assert first == second and 0 < first < 2
    assert parts.raw_unet.training  # the mode is restored
    # rank slices: without torch.distributed each returns its share of the global mean; the shares add up
    shares = [HeldOut(held, cfg, parts, rank=r, world_size=2).loss(parts) for r in range(2)]
    assert sum(shares) == pytest.approx(first, rel=1e-6)


def test_val_loss_moves_when_the_adapter_changes(parts_and_held):
    cfg, parts, held = parts_and_held
    h = HeldOut(held, cfg, parts)
    before = h.loss(parts)
    with torch.no_grad():
        for name, p in parts.raw_unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    assert h.loss(parts) != pytest.approx(before, rel=1e-4)
