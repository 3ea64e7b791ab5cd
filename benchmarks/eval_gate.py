"""Calibrate the generic gate (configs/eval.yaml) on several toy concepts: trained adapters pass, broken ones fail.

    python benchmarks/eval_gate.py                                   # ~10 min on 2 idle CPU cores (make bench-eval)
    python benchmarks/eval_gate.py --concepts striped,framed auto_suite.images_per_prompt=1   # quicker
    python benchmarks/eval_gate.py --adapter runs/train/adapter      # also score an adapter of data/toy-sks (sks)

For each concept — dotted, striped, checkered (patterns the toy CLIP knows by name) and framed (a dotted frame
around a plain centre, which the toy CLIP never saw nor has a word for) — each behind its own trigger, it writes the
toy dataset into a temporary folder and trains on one plain worker with ``CALIBRATION_RECIPE`` (configs/train.yaml
at rank 16, alpha 4): (trained) 60 epochs, (1 epoch) the same cut short, (wrong concept) 60 epochs on another
pattern's images with this concept's trigger, (random weights) the trained adapter's shapes with noise. Each is
scored by one ``Evaluator`` per dataset (``configs/eval.yaml``: the suite built from the dataset's captions, the
relative gate; MLflow and the registry off) against one rendering of the base model. Prints every metric and
verdict, then each check's margins: how far the worst trained adapter clears it, and how far the broken adapters it
catches fall short, and every verdict other than "trained passes, broken fails". Writes
``runs/benchmarks/eval_gate.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from evaluation.config import EvalConfig
from evaluation.evaluate import CANDIDATE, Evaluator
from evaluation.gate import run_gate
from evaluation.registry import fetch_adapter
from evaluation.suite import materialise
from training.adapter import verify_adapter
from training.configuration import load_config
from training.toy_world.adapters import CALIBRATION_RECIPE, randomize_adapter, train_toy_adapter
from training.toy_world.dataset import write_finetune_dataset

REPO = Path(__file__).resolve().parents[1]
CONCEPTS = {"dotted": "sks", "striped": "ohwx", "checkered": "zyx42", "framed": "qpv"}  # concept -> trigger
# the wrong concept's images: a cycle, so each pattern is once the wrong one; framed's is dotted, the closest
WRONG = {"dotted": "striped", "striped": "checkered", "checkered": "framed", "framed": "dotted"}
KINDS = ("trained", "1 epoch", "wrong concept", "random weights")
SHOWN = ("concept_gain", "concept_win_rate", "clip_i", "heldout_loss_ratio", "heldout_loss", "flexibility_delta",
         "flexibility_hit_rate", "prior_similarity", "success_rate", "latency_p95_s")  # fmt: skip


def adapters(root: Path, concept: str, trigger: str) -> tuple[Path, dict[str, Path]]:
    """The concept's dataset and its four adapters (trained, 1 epoch, wrong concept, random weights); what is
    already under ``root`` (a kept --workdir) is reused, not made again."""
    w = WRONG[concept]
    data, wrong = root / f"{trigger}-{concept}", root / f"{trigger}-as-{w}"
    if not data.is_dir():
        write_finetune_dataset(data, trigger=trigger, concept=concept)
    if not wrong.is_dir():
        write_finetune_dataset(wrong, trigger=trigger, concept=w)
    recipes = {  # kind: (output folder, training data, dotted overrides)
        "trained": (root / f"{concept}-trained", data, CALIBRATION_RECIPE),
        "1 epoch": (root / f"{concept}-1-epoch", data, CALIBRATION_RECIPE | {"train.epochs": "1"}),
        "wrong concept": (root / f"{concept}-wrong", wrong, CALIBRATION_RECIPE),
    }
    trig = {"data.trigger": trigger}  # configs/train.yaml names sks: the adapter's metadata records this one
    out = {}
    for kind, (folder, train_data, overrides) in recipes.items():
        done = folder / "adapter"
        out[kind] = done if done.is_dir() else train_toy_adapter(REPO, train_data, folder, **trig, **overrides)
    random = root / f"{concept}-random"
    out["random weights"] = random if random.is_dir() else randomize_adapter(out["trained"], random)
    return data, out


def measure(root: Path, concept: str, overrides: list[str], extra: Path | None, scratch: Path) -> dict:
    """Every adapter of ``concept`` scored by one Evaluator on its dataset's built suite, with its gate."""
    trigger = CONCEPTS[concept]
    t0 = time.perf_counter()
    data, found = adapters(root, concept, trigger)
    if extra is not None and verify_adapter(extra).trigger == trigger:
        found["--adapter"] = extra
    elif extra is not None:
        print(f"--adapter {extra}: its trigger is {verify_adapter(extra).trigger!r}, not {trigger!r}; not scored")
    trained_s = time.perf_counter() - t0
    values = [f"clip_model={REPO / 'models' / 'toy-clip'}", f"output_dir={scratch / 'eval'}",
              f"data.train_path={data}", f"data.heldout_path={data / 'heldout'}",
              "mlflow.enabled=false", "registry.enabled=false"]  # fmt: skip
    cfg = materialise(load_config(EvalConfig, REPO / "configs" / "eval.yaml", values + overrides), trigger)
    evaluator = Evaluator(cfg, str(REPO / "models" / "toy-sd"))
    out = {"trigger": trigger, "wrong_concept_images": WRONG[concept], "base": evaluator.base_metrics, "adapters": {}}
    for kind, path in found.items():
        metrics, _ = evaluator.evaluate(fetch_adapter(str(path), scratch / "dl"), CANDIDATE, timed=True)
        gate = run_gate(metrics, cfg.gate)
        out["adapters"][kind] = {"metrics": metrics, "passed": gate.passed, "checks": gate.to_dict()["checks"]}
    out["seconds"] = {"training": round(trained_s, 1), "total": round(time.perf_counter() - t0, 1)}
    out["suite"] = {"prompts": len(cfg.suite.prompts), "prior_prompts": len(cfg.suite.prior_prompts),
                    "images_per_prompt": cfg.suite.images_per_prompt}  # fmt: skip
    out["gate"] = cfg.gate.model_dump(mode="json")
    return out


def _f(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def print_concept(name: str, r: dict) -> None:
    kinds = list(r["adapters"])
    print(f"\n{name} (trigger {r['trigger']}; wrong concept = {r['wrong_concept_images']} images; "
          f"{r['suite']['prompts']} prompts x {r['suite']['images_per_prompt']} seeds)")  # fmt: skip
    print(f"{'metric':22s}{'base':>10s}" + "".join(f"{k:>16s}" for k in kinds))
    for metric in SHOWN:
        row = [r["adapters"][k]["metrics"].get(metric) for k in kinds]
        print(f"{metric:22s}{_f(r['base'].get(metric)):>10s}" + "".join(f"{_f(v):>16s}" for v in row))
    verdicts = ["passed" if r["adapters"][k]["passed"] else "FAILED" for k in kinds]
    print(f"{'gate':22s}{'':>10s}" + "".join(f"{v:>16s}" for v in verdicts))


def margins(results: dict) -> dict[str, dict[str, dict]]:
    """Per check, per kind: the trained adapters' smallest margin (how safely they all pass) and each broken
    kind's largest margin (how close its best case comes to passing; negative = every concept's fails it)."""
    out: dict[str, dict[str, dict]] = {}
    for concept, r in results.items():
        for kind, a in r["adapters"].items():
            for c in a["checks"]:
                m = c["margin"] if c["margin"] is not None else -math.inf  # not measured: fails outright
                row = out.setdefault(c["name"], {}).setdefault(kind, {"margin": None, "concept": None})
                old = -math.inf if row["concept"] is not None and row["margin"] is None else row["margin"]
                if row["concept"] is None or (m < old if kind == "trained" else m > old):
                    row.update(margin=None if math.isinf(m) else m, concept=concept)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concepts", default=",".join(CONCEPTS), help=f"comma-separated, of {', '.join(CONCEPTS)}")
    p.add_argument("--adapter", default=None, help="also score this adapter (trigger sks) on the dotted dataset")
    p.add_argument("--out", default="runs/benchmarks/eval_gate.json")
    p.add_argument(
        "--workdir", default=None, help="keep datasets and adapters here and reuse them (default: a temp dir)"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides of configs/eval.yaml, e.g. generation.steps=10")
    args = p.parse_args(argv)
    concepts = args.concepts.split(",")
    if unknown := [c for c in concepts if c not in CONCEPTS]:
        p.error(f"--concepts: unknown {unknown}; use {', '.join(CONCEPTS)}")

    results = {}
    with tempfile.TemporaryDirectory(prefix="eval-gate-") as tmp:
        for concept in concepts:
            extra = Path(args.adapter) if args.adapter and concept == "dotted" else None
            root = Path(args.workdir or tmp).expanduser() / concept
            results[concept] = measure(root, concept, args.overrides, extra, Path(tmp))
            print_concept(concept, results[concept])

    table = margins(results)
    print("\nmargins per check (trained: the smallest over concepts, >= 0 passes; broken: the largest, < 0 fails)")
    print(f"{'check':34s}" + "".join(f"{k:>20s}" for k in KINDS))
    for check, kinds in table.items():
        cells = [kinds.get(k) for k in KINDS]
        print(f"{check:34s}" + "".join(f"{_f(c['margin']) + ' ' + c['concept'][:5]:>20s}" if c else f"{'':>20s}"
                                       for c in cells))  # fmt: skip
    wrong = [f"{c} {k}: " + ("passed" if a["passed"] else "failed " + ", ".join(
                 x["name"] for x in a["checks"] if not x["passed"]))
             for c, r in results.items() for k, a in r["adapters"].items()
             if k in KINDS and a["passed"] != (k == "trained")]  # fmt: skip
    print("\nevery verdict as expected" if not wrong else "\nnot as expected:\n  " + "\n  ".join(wrong))
    summary = {"concepts": results, "margins": table, "not_as_expected": wrong, "overrides": args.overrides}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
