"""Training throughput: the Ray Train path vs the plain loop vs loops that encode every step, interleaved.

    python benchmarks/train_throughput.py                          # toy model, 20 images, batch 4, 3 rounds
    python benchmarks/train_throughput.py --epochs 4 --rounds 2    # quicker

Four arms, same model, data, batch size and seed:

(a) ray       — ``training.train.run``: Ray Train V2, 1 worker with as many CPUs as the plain loop's torch threads;
(b) plain     — the plain loop (``training.loop.train_loop``) on cached latents and text embeddings;
(c) reference — the loop that decodes the images and runs the VAE and the text encoder every step, as diffusers'
    ``examples/text_to_image/train_text_to_image_lora.py`` does, with its input pipeline: a
    ``torch.utils.data.DataLoader(..., num_workers=args.dataloader_num_workers)`` whose worker processes decode and
    transform the images (``preprocess_train``) while the main process encodes and trains. The script's default is
    ``--dataloader_num_workers 0``; users raise it, so (c) uses ``--loader-workers`` (default 2) and
(c0) reference-w0 — the same with ``num_workers=0`` (the script's default: decoding in the training process).

Every round runs every arm once, in an order rotated per round (so no arm always runs first or last on a machine
whose load drifts); the figure per arm is the median images/s over all rounds' epochs after the first (warm-up),
the same for every arm. Prints the ratios and writes ``runs/benchmarks/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from training.config import TrainConfig
from training.data import validate_dataset
from training.dataset import Batch, PixelSource, epoch_batches, load_image, make_source
from training.loop import make_state, train_loop
from training.toy_world.dataset import write_finetune_dataset
from training.worker import build_worker_parts

REPO = Path(__file__).resolve().parents[1]
ARMS = ("ray", "plain", "reference", "reference-w0")
LABELS = {
    "ray": "(a) Ray Train, 1 worker",
    "plain": "(b) plain loop, cached",
    "reference": "(c) encode every step, loader workers",
    "reference-w0": "(c0) encode every step, 0 workers",
}


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


class _Decoded(Dataset):
    """diffusers' ``preprocess_train`` per image, run in a DataLoader worker: decode, resize/crop, maybe mirror."""

    def __init__(self, source: PixelSource, seed: int):
        self.source, self.seed = source, seed

    def __len__(self) -> int:
        return len(self.source.examples)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        i, draw = key  # draw: a per-draw seed, so crops and flips differ between epochs as in the script
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
        data = self.source.data
        flip = bool(data.random_flip and torch.rand(1, generator=gen).item() < 0.5)
        return load_image(
            self.source.examples[i].path, self.source.buckets[i], data.crop, flip, gen, data.background_rgb
        )


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding is single-threaded PIL work; the training process keeps the cores


class _Orders:
    """Stands in for a source in ``epoch_batches`` to list an epoch's index batches without decoding anything."""

    def __init__(self, source: PixelSource):
        self.groups = source.groups

    def batch(self, idx: list[int], gen: torch.Generator) -> list[int]:
        return idx


class LoaderPixelSource(PixelSource):
    """``PixelSource`` whose images come from a ``DataLoader`` with ``num_workers`` worker processes, prefetching
    the whole run's batches in the order ``train_loop`` asks for them (``epoch_batches``: same seed → same order).
    The text encoder and the VAE still run in the training step, as in diffusers' script."""

    def __init__(self, *args, num_workers: int, epochs: int, batch_size: int, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        order = [idx for e in range(epochs) for idx in epoch_batches(_Orders(self), batch_size, seed, e)]
        self._expected = iter(order)
        draws, k = [], 0
        for idx in order:
            draws.append([(i, k + j) for j, i in enumerate(idx)])
            k += len(idx)
        loader = DataLoader(
            _Decoded(self, seed),
            batch_sampler=draws,
            num_workers=num_workers,
            worker_init_fn=_one_thread,
        )
        self._batches = iter(loader)

    def batch(self, idx: list[int], gen: torch.Generator) -> Batch:
        expected = next(self._expected)
        if expected != idx:  # the loader prefetches a precomputed order: it must be the loop's own
            raise RuntimeError(f"the loop asked for batch {idx}, the loader holds {expected}")
        pixels = next(self._batches)
        return Batch(self.input_ids[idx], pixels=pixels, prompt_embeds=None, prior=self._prior(idx))


def _plain(cfg: TrainConfig, arm: str, loader_workers: int) -> dict:
    """One run of (b), (c) or (c0); returns per-epoch images/s and the wall time including the cache build."""
    start = time.perf_counter()
    examples = validate_dataset(cfg.data).examples
    parts = build_worker_parts(cfg, torch.device("cpu"))
    if arm == "plain":
        source = make_source(examples, cfg.data, parts, use_cache=True)
    else:
        workers = loader_workers if arm == "reference" else 0
        t = cfg.train
        source = LoaderPixelSource(examples, cfg.data, parts, cache_text=False, num_workers=workers, epochs=t.epochs,
                                   batch_size=t.batch_size, seed=t.seed)  # fmt: skip
    state = make_state(cfg, parts, source.batches_per_epoch(cfg.train.batch_size))
    train_loop(cfg, parts, source, state, report=lambda m, s: None)
    return {"images_per_s": [m["images_per_s"] for m in state.history], "wall_s": time.perf_counter() - start}


def _ray(cfg: TrainConfig) -> dict:
    from training.ray_train import init_ray
    from training.train import run

    init_ray()  # once per process; the cluster's start-up is in no arm's figure
    start = time.perf_counter()
    result = run(cfg)
    return {"images_per_s": [m["images_per_s"] for m in result.history], "wall_s": time.perf_counter() - start}


def _steady(runs: list[dict]) -> float:
    return statistics.median(x for r in runs for x in r["images_per_s"][1:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every arm once (order rotated)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every arm (default: all)")
    parser.add_argument("--loader-workers", type=int, default=2, help="(c)'s DataLoader num_workers")
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "train_throughput.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # the Ray worker gets the same through cpus_per_worker

    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    orders = []
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as tmp:
        dataset = write_finetune_dataset(Path(tmp) / "toy-sks", num_images=20, seed=0)
        for i in range(args.rounds):
            order = ARMS[i % len(ARMS) :] + ARMS[: i % len(ARMS)]
            orders.append(list(order))
            for arm in order:
                cfg = _config(dataset, Path(tmp) / f"{arm}{i}", args.epochs, args.batch_size)
                runs[arm].append(_ray(cfg) if arm == "ray" else _plain(cfg, arm, args.loader_workers))
                print(f"round {i + 1}/{args.rounds} {arm}: {_steady(runs[arm][-1:]):.1f} images/s", flush=True)

    ips = {k: _steady(v) for k, v in runs.items()}
    figures = {
        "images_per_s": ips,
        "ray_over_plain": ips["ray"] / ips["plain"],
        "plain_over_reference": ips["plain"] / ips["reference"],
        "plain_over_reference_w0": ips["plain"] / ips["reference-w0"],
        "reference_over_reference_w0": ips["reference"] / ips["reference-w0"],
        "wall_s": {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()},
        "setup": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "images": 20,
            "rounds": args.rounds,
            "orders": orders,
            "threads": torch.get_num_threads(),
            "loader_workers": args.loader_workers,
        },
        "runs": runs,
    }
    print(f"images/s (median over {args.rounds} rounds × epochs 2..{args.epochs}, arms interleaved):")
    for name in ARMS:
        print(f"  {LABELS[name]:40s} {ips[name]:8.1f}   wall {figures['wall_s'][name]:6.1f}s (median run)")
    print(
        f"(a)/(b) = {figures['ray_over_plain']:.2f}   (b)/(c) = {figures['plain_over_reference']:.2f}   "
        f"(b)/(c0) = {figures['plain_over_reference_w0']:.2f}   (c)/(c0) = {figures['reference_over_reference_w0']:.2f}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
