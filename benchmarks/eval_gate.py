"""The evaluation gate on a trained toy adapter and on broken ones, side by side in one run.

    python benchmarks/eval_gate.py                                  # ~3 min on 2 CPU cores (make bench-eval)
    python benchmarks/eval_gate.py --adapter runs/train/adapter     # also score an adapter you trained

Writes the toy datasets (`sks` = dotted, and `sks` = striped) to a temporary folder, trains with
``configs/train.yaml``'s recipe on one plain worker: (good) 30 epochs on the dotted set, (2 epochs) the same
cut short, (wrong concept) 30 epochs on the striped set, plus (random) the good adapter's shapes with random
weights. Each is scored by the same ``Evaluator`` (``configs/eval.yaml``: full suite, default gate; MLflow
and the registry off), against one rendering of the base model. Prints every metric next to the base
model's and each gate's failed checks; writes ``runs/benchmarks/eval_gate.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from evaluation.config import METRICS, EvalConfig
from evaluation.evaluate import CANDIDATE, Evaluator
from evaluation.gate import run_gate
from evaluation.registry import fetch_adapter
from training.configuration import load_config
from training.toy_world.adapters import randomize_adapter, train_toy_adapter
from training.toy_world.dataset import write_finetune_dataset

REPO = Path(__file__).resolve().parents[1]


def adapters(root: Path, extra: str | None) -> dict[str, Path]:
    dotted = write_finetune_dataset(root / "toy-sks")
    striped = write_finetune_dataset(root / "toy-sks-striped", concept="striped")
    good = train_toy_adapter(REPO, dotted, root / "good")
    out = {
        "trained": good,
        "2 epochs": train_toy_adapter(REPO, dotted, root / "short", **{"train.epochs": "2"}),
        "wrong concept": train_toy_adapter(REPO, striped, root / "striped"),
        "random weights": randomize_adapter(good, root / "random"),
    }
    if extra:
        out["--adapter"] = Path(extra)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapter", default=None, help="also evaluate this adapter folder")
    p.add_argument("--out", default="runs/benchmarks/eval_gate.json")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="eval-gate-") as tmp:
        root = Path(tmp)
        found = adapters(root, args.adapter)
        data = root / "toy-sks"
        overrides = [f"clip_model={REPO / 'models' / 'toy-clip'}", f"output_dir={root / 'eval'}",
                     f"data.train_path={data}", f"data.heldout_path={data / 'heldout'}",
                     "mlflow.enabled=false", "registry.enabled=false"]  # fmt: skip
        cfg = load_config(EvalConfig, REPO / "configs" / "eval.yaml", overrides)
        evaluator = Evaluator(cfg, str(REPO / "models" / "toy-sd"))
        results = {"base model": {"metrics": evaluator.base_metrics}}
        for name, path in found.items():
            metrics, _ = evaluator.evaluate(fetch_adapter(str(path), root / "dl"), CANDIDATE, timed=True)
            gate = run_gate(metrics, cfg.gate)
            results[name] = {"metrics": metrics, "passed": gate.passed, "failures": gate.failures()}

    names = list(results)
    print(f"{'metric':22s}" + "".join(f"{n:>16s}" for n in names))
    for metric in METRICS:
        values = [results[n]["metrics"].get(metric, math.nan) for n in names]
        print(f"{metric:22s}" + "".join(f"{v:16.4f}" for v in values))
    verdicts = ["" if n == "base model" else "passed" if results[n]["passed"] else "FAILED" for n in names]
    print(f"{'gate':22s}" + "".join(f"{v:>16s}" for v in verdicts))
    for name in names[1:]:
        for failure in results[name]["failures"]:
            print(f"  {name}: {failure}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
