"""Search efficiency: Optuna (TPE) + ASHA vs the classic grid vs random search, same objective, one run.

    python benchmarks/tune_efficiency.py                       # ~15 min on 2 CPU cores
    python benchmarks/tune_efficiency.py --samples 8 --grid-epochs 4,6   # quicker, smaller
    python benchmarks/tune_efficiency.py --replot                        # redraw from the last run's JSON

Every search runs through ``tuning.tune.run`` on the toy dataset (20 images, 12 held-out images)
and optimises the same metric, the held-out denoising loss ``val_loss`` at the trial's last epoch:

- grid   — configs/tune.yaml's grid (rank 16/32/64 × lr 1e-5/5e-5/1e-4 × AdamW/Prodigy × 10/15/20
           epochs; AdamW8bit is dropped on CPU, Prodigy's lr axis collapses to lr=1): 36 trials, FIFO;
- optuna — TPE over the grid's rank / optimizer / lr values as choices; epochs are not sampled but
           allocated by ASHA (every trial may train up to the grid's longest, 20; grace 2, factor 3);
- random — Optuna's RandomSampler over the grid's values including epochs, FIFO, as many trials as optuna.

The cost is trial-epochs (epochs actually trained, summed over trials); start-up per trial is the
same for all three. Prints a table and the two target ratios, writes
``runs/benchmarks/tune_efficiency.json`` and the best-so-far curves to ``docs/tune_efficiency.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from training.configuration import load_config
from training.toy_world.dataset import write_finetune_dataset
from tuning.config import TuneConfig
from tuning.results import TrialRecord
from tuning.tune import run

REPO = Path(__file__).resolve().parents[1]


def grid_space(grid_epochs: list[int]) -> str:
    """The grid's values as categorical choices (lr only for AdamW; Prodigy at lr=1, d_coef=1 as in the grid)."""
    return (
        "space={"
        "lora.rank: {type: choice, values: [16, 32, 64]}, "
        "train.optimizer: {type: choice, values: [adamw, adamw8bit, prodigy]}, "
        "train.lr: {type: choice, values: [1.0e-5, 5.0e-5, 1.0e-4], when: {train.optimizer: [adamw, adamw8bit]}}"
        + (f", train.epochs: {{type: choice, values: {grid_epochs}}}" if grid_epochs else "")
        + "}"
    )


def best_so_far(records: list[TrialRecord], mode: str = "min") -> list[tuple[int, float]]:
    """(cumulative trial-epochs, best metric so far) after each trial, in completion order."""
    curve, spent, best = [], 0, None
    for r in sorted(records, key=lambda r: r.ended_at):
        spent += r.epochs
        if r.metric is not None and r.status != "failed":
            best = r.metric if best is None else (min if mode == "min" else max)(best, r.metric)
        if best is not None:
            curve.append((spent, best))
    return curve


def plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, curve in curves.items():
        xs, ys = zip(*curve)
        ax.step(xs, ys, where="post", marker="o", markersize=3, label=name)
    ax.set_yscale("log")  # a diverged trial (Prodigy) would flatten everything else
    ax.set_xlabel("trial-epochs spent (cumulative, in completion order)")
    ax.set_ylabel("best held-out val_loss so far")
    ax.set_title("LoRA search on the toy dataset: best metric vs budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=16, help="trials for optuna and for random")
    parser.add_argument("--grid-epochs", default="10,15,20", help="the grid's epoch values (and the space's)")
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "tune_efficiency"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "tune_efficiency.png"))
    parser.add_argument("--replot", action="store_true", help="redraw the plot from the last run's JSON only")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((Path(args.out).parent / "tune_efficiency.json").read_text())
        plot({k: [tuple(p) for p in v] for k, v in saved["curves"].items()}, Path(args.plot))
        return
    logging.basicConfig(level=logging.WARNING)
    epochs = [int(e) for e in args.grid_epochs.split(",")]

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    data = write_finetune_dataset(out / "data", num_images=20, num_validation=6, seed=0)
    common = [
        f"output_dir={out}",
        f"trial.base_model={REPO / 'models' / 'toy-sd'}",
        f"trial.data.path={data}",
        f"trial.validation.data_path={data / 'heldout'}",
        "trial.mlflow.enabled=false",  # the comparison is about the search, not the logging
        f"grid.train.epochs={epochs}",
    ]
    n = f"search.num_samples={args.samples}"
    searches = {
        "grid": ["search.algorithm=grid", "search.scheduler=fifo"],
        # ASHA allocates the epochs: every trial may run to the grid's longest, bad ones stop at a rung
        "optuna+asha": ["search.algorithm=optuna", "search.scheduler=asha", n, grid_space([]),
                        f"trial.train.epochs={max(epochs)}", "search.grace_period=2", "search.reduction_factor=3"],
        "random": ["search.algorithm=random", "search.scheduler=fifo", n, grid_space(epochs)],
    }  # fmt: skip
    results: dict[str, dict] = {}
    curves = {}
    for name, overrides in searches.items():
        cfg = load_config(
            TuneConfig,
            REPO / "configs" / "tune.yaml",
            [*common, "search.points_to_evaluate=[]", *overrides, f"name={name.replace('+', '-')}"],
        )
        start = time.perf_counter()
        result = run(cfg)
        wall = time.perf_counter() - start
        best = result.best["best"]
        results[name] = {
            "trials": len(result.records),
            "statuses": result.best["trials"],
            "trial_epochs": result.best["trial_epochs"],
            "best_val_loss": best["value"] if best else None,
            "best_overrides": best["overrides"] if best else None,
            "wall_s": round(wall, 1),
        }
        curves[name] = best_so_far(result.records)
        print(f"{name}: {json.dumps(results[name])}", flush=True)

    grid = results["grid"]
    rows = []
    for name, r in results.items():
        gap = (r["best_val_loss"] - grid["best_val_loss"]) / grid["best_val_loss"]
        r["gap_to_grid_best"] = gap
        r["trial_epochs_vs_grid"] = r["trial_epochs"] / grid["trial_epochs"]
        rows.append(
            f"{name:12s} {r['trials']:6d} {r['trial_epochs']:12d} {r['trial_epochs_vs_grid']:9.2f} "
            f"{r['best_val_loss']:12.5f} {gap:+9.2%} {r['wall_s']:8.0f}"
        )
    print(f"\n{'search':12s} {'trials':>6s} {'trial-epochs':>12s} {'vs grid':>9s} {'best val_loss':>12s} "
          f"{'vs grid':>9s} {'wall s':>8s}")  # fmt: skip
    print("\n".join(rows))
    opt = results["optuna+asha"]
    print(
        f"\noptuna+asha: best within {opt['gap_to_grid_best']:+.2%} of the grid's best "
        f"(target ≤ +2%) with {opt['trial_epochs_vs_grid']:.0%} of its trial-epochs (target ≤ 25%)"
    )
    (out.parent / "tune_efficiency.json").write_text(json.dumps({"results": results, "curves": curves}, indent=2))
    plot(curves, Path(args.plot))
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
