"""Training throughput: the Ray Train path vs the plain loop vs a loop that encodes every step.

    python benchmarks/train_throughput.py                 # toy model, 20 images, batch 4
    python benchmarks/train_throughput.py --epochs 4 --rounds 1   # quicker

(a) ``training.train.run`` — Ray Train V2, 1 worker (same CPU threads as the plain loop);
(b) the plain loop (``training.loop.train_loop``) on cached latents and text embeddings;
(c) the reference: the same loop, but every step decodes the images and runs the VAE and the
    text encoder, as diffusers' ``train_text_to_image_lora.py`` does.
Same model, data, batch size and seed. (b) and (c) are interleaved over ``--rounds``; the
figure per variant is the median images/s over epochs after the first (warm-up). Prints the
ratios and writes ``runs/benchmarks/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from training.config import TrainConfig
from training.data import validate_dataset
from training.dataset import PixelSource, make_source
from training.loop import make_state, train_loop
from training.toy_world.dataset import write_finetune_dataset
from training.worker import build_worker_parts

REPO = Path(__file__).resolve().parents[1]


def _config(dataset: Path, out: Path, epochs: int, batch_size: int) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "base_model": str(REPO / "models" / "toy-sd"),
            "output_dir": str(out),
            "run_name": "throughput",
            "data": {"path": str(dataset), "trigger": "sks"},
            "train": {"epochs": epochs, "batch_size": batch_size, "lr": 1e-3},
            # as many CPUs as the plain loop's torch threads, so Ray's OMP_NUM_THREADS matches
            "ray": {"num_workers": 1, "cpus_per_worker": torch.get_num_threads(), "checkpoint_every_n_epochs": epochs},
            "mlflow": {"enabled": False},
        }
    )


def _plain(cfg: TrainConfig, reference: bool) -> dict:
    """One run of (b) or (c); returns per-epoch images/s and the wall time including the cache build."""
    start = time.perf_counter()
    examples = validate_dataset(cfg.data).examples
    parts = build_worker_parts(cfg, torch.device("cpu"))
    source = (
        PixelSource(examples, cfg.data, parts, cache_text=False)
        if reference
        else make_source(examples, cfg.data, parts, use_cache=True)
    )
    state = make_state(cfg, parts, source.batches_per_epoch(cfg.train.batch_size))
    train_loop(cfg, parts, source, state, report=lambda m, s: None)
    return {"images_per_s": [m["images_per_s"] for m in state.history], "wall_s": time.perf_counter() - start}


def _ray(cfg: TrainConfig) -> dict:
    from training.ray_train import init_ray
    from training.train import run

    init_ray()
    start = time.perf_counter()
    result = run(cfg)
    return {"images_per_s": [m["images_per_s"] for m in result.history], "wall_s": time.perf_counter() - start}


def _steady(runs: list[dict]) -> float:
    return statistics.median(x for r in runs for x in r["images_per_s"][1:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of (b) and (c)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every variant (default: all)")
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "train_throughput.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # the Ray worker gets the same through cpus_per_worker

    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as tmp:
        dataset = write_finetune_dataset(Path(tmp) / "toy-sks", num_images=20, seed=0)
        runs: dict[str, list[dict]] = {"plain": [], "reference": [], "ray": []}
        for i in range(args.rounds):
            cfg = _config(dataset, Path(tmp) / f"out{i}", args.epochs, args.batch_size)
            runs["plain"].append(_plain(cfg, reference=False))
            runs["reference"].append(_plain(cfg, reference=True))
        runs["ray"].append(_ray(_config(dataset, Path(tmp) / "ray", args.epochs, args.batch_size)))

    ips = {k: _steady(v) for k, v in runs.items()}
    figures = {
        "images_per_s": ips,
        "ray_over_plain": ips["ray"] / ips["plain"],
        "plain_over_reference": ips["plain"] / ips["reference"],
        "wall_s": {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()},
        "setup": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "images": 20,
            "threads": torch.get_num_threads(),
        },
        "runs": runs,
    }
    print(f"images/s (median of epochs 2..{args.epochs}):")
    for name, label in (
        ("ray", "(a) Ray Train, 1 worker"),
        ("plain", "(b) plain loop, cached"),
        ("reference", "(c) encode every step"),
    ):
        print(f"  {label:28s} {ips[name]:8.1f}   wall {figures['wall_s'][name]:6.1f}s")
    print(f"(a)/(b) = {figures['ray_over_plain']:.2f}   (b)/(c) = {figures['plain_over_reference']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
