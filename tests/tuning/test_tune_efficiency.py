"""benchmarks/tune_efficiency.py's arithmetic: equal-budget bests and each part's contribution (no trials run)."""

from __future__ import annotations

import pytest

from benchmarks.tune_efficiency import ARMS, best_within, continuous_space, spread, summarise


def run(curve: list[tuple[int, float]]) -> tuple[dict, list]:
    return {"trial_epochs": curve[-1][0], "best_val_loss": curve[-1][1], "wall_s": 1.0}, curve


def test_best_within_reads_the_curve_at_a_budget():
    curve = [(8, 0.3), (16, 0.2), (40, 0.1)]
    assert best_within(curve, 16) == 0.2 and best_within(curve, 39) == 0.2 and best_within(curve, 7) is None


def test_spread_skips_missing_values():
    assert spread([0.3, None, 0.1, 0.2]) == {"median": 0.2, "min": 0.1, "max": 0.3, "n": 3}


def test_summary_separates_tpe_and_asha():
    # TPE finds 0.10 where random finds 0.20 (same scheduler); ASHA spends half the trial-epochs of FIFO
    found = {
        "grid": [run([(20, 0.15), (240, 0.12)])],
        "tpe+fifo": [run([(20, 0.3), (80, 0.10)])] * 3,
        "random+fifo": [run([(20, 0.3), (80, 0.20)])] * 3,
        "tpe+asha": [run([(10, 0.3), (40, 0.10)])] * 3,
        "random+asha": [run([(10, 0.3), (40, 0.20)])] * 3,
    }
    runs = {arm: [r for r, _ in found[arm]] for arm in found}
    curves = {arm: [c for _, c in found[arm]] for arm in found}
    s = summarise(runs, curves)
    assert s["equal_budget_trial_epochs"] == 40
    parts = s["contributions"]
    assert parts["tpe_vs_random_fifo"]["best_val_loss_gap"] == pytest.approx(-0.5)
    assert parts["tpe_vs_random_fifo"]["seeds_tpe_better"] == 3
    assert parts["tpe_vs_random_fifo"]["equal_budget_gap"] == pytest.approx(0.0)  # by 40 epochs FIFO has only 0.3
    assert parts["asha_vs_fifo_tpe"]["trial_epochs_ratio"] == pytest.approx(0.5)
    assert s["arms"]["tpe+asha"]["gap_to_grid_best"] == pytest.approx(0.10 / 0.12 - 1)
    assert set(s["arms"]) == {"grid", *ARMS}


def test_the_space_has_the_grids_bounds_not_its_points():
    space = continuous_space([16, 32, 64], [1e-5, 5e-5, 1e-4])
    assert space["train.lr"]["type"] == "loguniform"
    assert (space["train.lr"]["low"], space["train.lr"]["high"]) == (1e-5, 1e-4)
    assert space["lora.rank"]["values"] == [16, 32, 64]
