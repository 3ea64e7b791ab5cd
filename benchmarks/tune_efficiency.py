"""Search efficiency: what TPE and ASHA each add over random search, with the classic grid as reference.

    python benchmarks/tune_efficiency.py                   # 3 seeds × 4 arms × 8 trials + the 36-point grid
    python benchmarks/tune_efficiency.py --quick           # 1 seed, 4 trials, 4 epochs, a 6-point grid
    python benchmarks/tune_efficiency.py --seeds 2 --samples 4 --startup-trials 2 --grid-epochs 8 \
        --grid-ranks 16,64 --grid-lrs 1e-5,1e-4            # the reduced run the README reports (38 trials)
    python benchmarks/tune_efficiency.py --replot          # summary + plot again from the (maybe partial) JSON

Every search runs through ``tuning.tune.run`` on the toy dataset (20 training images, 6 held-out
images, trial seed 0) and optimises the same real metric: the held-out denoising loss ``val_loss``
at the trial's last epoch. Arms:

- grid (reference) — configs/tune.yaml's grid: rank 16/32/64 × lr 1e-5/5e-5/1e-4 × AdamW/Prodigy ×
  10/15/20 epochs, FIFO (AdamW8bit is dropped on CPU; Prodigy's lr axis collapses to lr=1): 36 trials.
- {tpe, random} × {fifo, asha} — the SAME continuous space with the grid's bounds: lr log-uniform in
  [1e-5, 1e-4] (AdamW only; Prodigy at lr=1 as in the grid), rank categorical {16, 32, 64}, optimizer
  {AdamW, Prodigy}. Every trial may train the grid's longest (20 epochs): FIFO runs it to the end, ASHA
  (grace 2, reduction factor 3) stops trials that trail at a rung. Epochs are not sampled, so the only
  difference between a fifo and an asha arm is the scheduler, and between tpe and random the sampler.
  Each arm runs ``--samples`` trials for each of ``--seeds`` sampler seeds (TPE's first
  ``--startup-trials`` are random draws, as Optuna's ``n_startup_trials``).

Cost on 2 cores: a trial is ~10 s of Ray start-up plus ~1 s per epoch when the machine is idle, so the full run
(132 trials, ~1,300 trial-epochs) takes about 25 min and --quick (22 trials) about 3; on a machine shared with
other jobs (load average ~17) a trial took ~4 min, 15× longer: cut seeds/samples/grid (the README says which run
its figures come from).

The space is no longer the grid's points, so finding the grid's best is not guaranteed: lr is
continuous and the grid's best sits at its corner (lr 1e-4, 20 epochs). Cost = trial-epochs (epochs
actually trained, summed over trials); start-up per trial is the same for every arm. Per arm the
table gives the median and [min, max] over seeds of the best val_loss, of the trial-epochs, and of
the best reached within an EQUAL budget (the trial-epochs of the cheapest seeded search, so every arm
is compared at the same compute). Then each part's contribution: TPE = tpe vs random under the same
scheduler; ASHA = asha vs fifo under the same sampler. Writes ``runs/benchmarks/tune_efficiency.json``
and the best-so-far curves to ``docs/tune_efficiency.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from pathlib import Path

from training.configuration import load_config
from training.toy_world.dataset import write_finetune_dataset
from tuning.config import TuneConfig
from tuning.results import TrialRecord
from tuning.tune import run

REPO = Path(__file__).resolve().parents[1]
ARMS = ("tpe+fifo", "tpe+asha", "random+fifo", "random+asha")
QUICK = {"seeds": 1, "samples": 4, "grid_epochs": "4", "grid_ranks": "16,64", "grid_lrs": "1e-5,1e-4", "grace": 1,
         "out": str(REPO / "runs" / "benchmarks" / "tune_efficiency_quick"),
         "plot": str(REPO / "runs" / "benchmarks" / "tune_efficiency_quick.png")}  # fmt: skip


def continuous_space(ranks: list[int], lrs: list[float]) -> dict:
    """The grid's bounds as a TPE/random space: lr log-uniform over [min, max] of the grid's lrs (AdamW only),
    rank categorical over the grid's ranks, optimizer AdamW/Prodigy (8-bit AdamW is dropped on CPU)."""
    return {
        "lora.rank": {"type": "choice", "values": ranks},
        "train.optimizer": {"type": "choice", "values": ["adamw", "adamw8bit", "prodigy"]},
        "train.lr": {
            "type": "loguniform", "low": min(lrs), "high": max(lrs), "when": {"train.optimizer": ["adamw", "adamw8bit"]}
        },
    }  # fmt: skip


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


def best_within(curve: list[tuple[int, float]], budget: int) -> float | None:
    """The best metric reached once no more than ``budget`` trial-epochs were spent (None: nothing by then)."""
    inside = [best for spent, best in curve if spent <= budget]
    return inside[-1] if inside else None


def spread(values: list[float | None]) -> dict:
    """Median, min and max of the values that exist (a seed whose search found nothing is left out, counted)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def plot(curves: dict[str, list[list[tuple[int, float]]]], path: Path) -> None:
    """One colour per arm, one line per seed (thin), the grid thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = dict(zip(("grid", *ARMS), ("black", "tab:blue", "tab:cyan", "tab:red", "tab:orange")))
    for name, per_seed in curves.items():
        for i, curve in enumerate(per_seed):
            if curve:
                xs, ys = zip(*curve)
                ax.step(xs, ys, where="post", color=colours.get(name), lw=2 if name == "grid" else 1, alpha=0.8,
                        marker="o", markersize=2, label=name if i == 0 else None)  # fmt: skip
    ax.set_yscale("log")  # a diverged trial (Prodigy) would flatten everything else
    ax.set_xlabel("trial-epochs spent (cumulative, in completion order)")
    ax.set_ylabel("best held-out val_loss so far")
    ax.set_title("LoRA search on the toy dataset (one line per sampler seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def search(name: str, overrides: list[str]) -> tuple[dict, list[tuple[int, float]]]:
    """One search through ``tuning.tune.run``: its summary row and best-so-far curve."""
    cfg = load_config(TuneConfig, REPO / "configs" / "tune.yaml", [*overrides, f"name={name}"])
    start = time.perf_counter()
    result = run(cfg)
    best = result.best["best"] if result.best else None
    row = {
        "trials": len(result.records),
        "statuses": result.best["trials"] if result.best else {},
        "trial_epochs": sum(r.epochs for r in result.records),
        "best_val_loss": best["value"] if best else None,
        "best_overrides": best["overrides"] if best else None,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(f"{name}: {json.dumps(row)}", flush=True)
    return row, best_so_far(result.records)


def summarise(runs: dict[str, list[dict]], curves: dict[str, list[list]]) -> dict:
    """Per arm: medians and ranges over seeds, the best within the equal budget; then TPE's and ASHA's parts."""
    budget = min(r["trial_epochs"] for arm in ARMS for r in runs[arm])
    grid_best = runs["grid"][0]["best_val_loss"]
    table = {}
    for arm in ("grid", *ARMS):
        table[arm] = {
            "best_val_loss": spread([r["best_val_loss"] for r in runs[arm]]),
            "trial_epochs": spread([r["trial_epochs"] for r in runs[arm]]),
            "best_within_budget": spread([best_within(c, budget) for c in curves[arm]]),
            "wall_s": spread([r["wall_s"] for r in runs[arm]]),
        }

    def gap(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else (a - b) / b

    def med(arm: str, key: str) -> float | None:
        return table[arm][key]["median"]

    parts = {}
    for sched in ("fifo", "asha"):  # TPE's part: same scheduler, sampler swapped
        t, r = f"tpe+{sched}", f"random+{sched}"
        parts[f"tpe_vs_random_{sched}"] = {
            "best_val_loss_gap": gap(med(t, "best_val_loss"), med(r, "best_val_loss")),
            "equal_budget_gap": gap(med(t, "best_within_budget"), med(r, "best_within_budget")),
            "seeds_tpe_better": sum(
                a["best_val_loss"] < b["best_val_loss"]
                for a, b in zip(runs[t], runs[r])
                if None not in (a["best_val_loss"], b["best_val_loss"])
            ),  # fmt: skip
        }
    for sampler in ("tpe", "random"):  # ASHA's part: same sampler, scheduler swapped
        a, f = f"{sampler}+asha", f"{sampler}+fifo"
        parts[f"asha_vs_fifo_{sampler}"] = {
            "trial_epochs_ratio": med(a, "trial_epochs") / max(1, med(f, "trial_epochs")),
            "best_val_loss_gap": gap(med(a, "best_val_loss"), med(f, "best_val_loss")),
        }
    for arm in ("grid", *ARMS):
        table[arm]["gap_to_grid_best"] = gap(med(arm, "best_val_loss"), grid_best)
        table[arm]["trial_epochs_vs_grid"] = med(arm, "trial_epochs") / runs["grid"][0]["trial_epochs"]
    return {"equal_budget_trial_epochs": budget, "arms": table, "contributions": parts}


def show(summary: dict, seeds: int) -> None:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:+.1%}"

    def rng(s: dict, fmt: str) -> str:
        if s["median"] is None:
            return "-"
        return f"{s['median']:{fmt}} [{s['min']:{fmt}}, {s['max']:{fmt}}]"

    b = summary["equal_budget_trial_epochs"]
    print(f"\nmedian [min, max] over {seeds} seed(s); equal budget = {b} trial-epochs (the cheapest seeded search)")
    print(f"{'arm':12s} {'best val_loss':>28s} {'vs grid':>8s} {'trial-epochs':>18s} {'vs grid':>8s} "
          f"{'best within budget':>28s}")  # fmt: skip
    for arm, t in summary["arms"].items():
        print(f"{arm:12s} {rng(t['best_val_loss'], '.5f'):>28s} {pct(t['gap_to_grid_best']):>8s} "
              f"{rng(t['trial_epochs'], '.0f'):>18s} {t['trial_epochs_vs_grid']:8.2f} "
              f"{rng(t['best_within_budget'], '.5f'):>28s}")  # fmt: skip
    print("\nwhat each part contributes (medians; negative gap = lower val_loss = better):")
    for name, c in summary["contributions"].items():
        print(f"  {name:22s} " + "  ".join(f"{k}={pct(v)}" if "gap" in k else f"{k}={v:.2f}" if isinstance(v, float)
                                           else f"{k}={v}" for k, v in c.items()))  # fmt: skip


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="sampler seeds per arm (0, 1, …)")
    parser.add_argument("--samples", type=int, default=8, help="trials per search (every arm, every seed)")
    parser.add_argument("--startup-trials", type=int, default=3, help="TPE's random trials before it models")
    parser.add_argument("--grid-epochs", default="10,15,20", help="the grid's epochs; the longest is every arm's max")
    parser.add_argument("--grid-ranks", default="16,32,64", help="the grid's LoRA ranks (the space's choices)")
    parser.add_argument("--grid-lrs", default="1e-5,5e-5,1e-4", help="the grid's AdamW lrs (the space's bounds)")
    parser.add_argument("--grace", type=int, default=2, help="ASHA's grace period (epochs)")
    parser.add_argument("--quick", action="store_true", help=f"a small run to try the benchmark: {QUICK}")
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "tune_efficiency"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "tune_efficiency.png"))
    parser.add_argument("--replot", action="store_true", help="summary and plot again from the last run's JSON")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    saved_json = Path(args.out).with_suffix(".json")
    if args.replot:  # also the summary of an interrupted run (every search that finished is in the JSON)
        saved = json.loads(saved_json.read_text())
        summary = None
        if all(saved["runs"][arm] for arm in ("grid", *ARMS)):
            summary = summarise(saved["runs"], saved["curves"])
            show(summary, max(len(saved["runs"][arm]) for arm in ARMS))
            saved_json.write_text(json.dumps({**saved, **summary}, indent=2) + "\n")
        plot(saved["curves"], Path(args.plot))
        return summary
    logging.basicConfig(level=logging.WARNING)
    epochs = [int(e) for e in args.grid_epochs.split(",")]
    ranks = [int(r) for r in args.grid_ranks.split(",")]
    lrs = [float(x) for x in args.grid_lrs.split(",")]

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    data = write_finetune_dataset(out / "data", num_images=20, num_validation=6, seed=0)
    common = [
        f"output_dir={out}",
        f"trial.base_model={REPO / 'models' / 'toy-sd'}",
        f"trial.data.path={data}",
        f"trial.validation.data_path={data / 'heldout'}",
        "trial.mlflow.enabled=false",  # the comparison is about the search, not the logging
        "evaluation.enabled=false",
        "search.points_to_evaluate=[]",  # no known-good start: every arm starts from nothing
        f"grid.train.epochs={epochs}",
        f"grid.lora.rank={ranks}",
        f"grid.train.lr={lrs}",
    ]
    sampled = [
        f"space={json.dumps(continuous_space(ranks, lrs))}",
        f"trial.train.epochs={max(epochs)}",
        f"search.num_samples={args.samples}",
        f"search.startup_trials={args.startup_trials}",
        f"search.grace_period={args.grace}",
        "search.reduction_factor=3",
    ]
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "plot", "replot")}
    runs: dict[str, list[dict]] = {arm: [] for arm in ("grid", *ARMS)}
    curves: dict[str, list[list]] = {arm: [] for arm in runs}

    def keep(arm: str, found: tuple[dict, list]) -> None:  # saved after every search: a stopped run keeps its part
        runs[arm].append(found[0])
        curves[arm].append(found[1])
        saved_json.write_text(json.dumps({"setup": setup, "partial": True, "runs": runs, "curves": curves}) + "\n")

    keep("grid", search("grid", [*common, "search.algorithm=grid", "search.scheduler=fifo"]))
    for seed in range(args.seeds):  # seed-major: a slow machine late in the run slows every arm alike
        for arm in ARMS:
            sampler, sched = arm.split("+")
            algorithm = "optuna" if sampler == "tpe" else "random"
            chosen = [f"search.algorithm={algorithm}", f"search.scheduler={sched}", f"search.seed={seed}"]
            keep(arm, search(f"{sampler}-{sched}-s{seed}", [*common, *sampled, *chosen]))

    summary = summarise(runs, curves)
    show(summary, args.seeds)
    saved_json.write_text(json.dumps({"setup": setup, **summary, "runs": runs, "curves": curves}, indent=2) + "\n")
    plot(curves, Path(args.plot))
    print(f"json: {saved_json}\nplot: {args.plot}")
    return summary


if __name__ == "__main__":
    main()
