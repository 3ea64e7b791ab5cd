"""LoRA training and serving speed at Stable Diffusion 1.5's or SDXL's scale (random weights), side by side in one run.

    python benchmarks/gpu_bench.py --out runs/benchmarks/gpu_bench     # SD-1.5 size, 512 px, on a GPU (make bench-gpu)
    python benchmarks/gpu_bench.py --arch sdxl --out runs/benchmarks/gpu_bench_sdxl   # SDXL base size, 1024 px, GPU
    python benchmarks/gpu_bench.py --tiny --out /tmp/gpu-bench          # the same code at a few M params, 64 px, CPU
    python benchmarks/gpu_bench.py --tiny --arch sdxl --out /tmp/gpu-bench-sdxl       # SDXL's layout, tiny, CPU
    python benchmarks/gpu_bench.py --plot runs/benchmarks/gpu_bench/gpu_bench.json   # redraw the PNG (matplotlib)

Speed does not depend on weight values, so it builds SD 1.5's architecture with random weights
(``benchmarks/_sd_scale.py``: UNet 860 M, VAE 84 M, CLIP-L text encoder 123 M parameters, checked), saves it in
diffusers layout and loads it through the project's own loaders (``--arch sdxl``: SDXL base's architecture — UNet
2.57 B, VAE 84 M, CLIP-L 123 M + OpenCLIP-bigG 695 M text encoders, checked — at 1024 px), then measures:

- training (``training.loop.train_loop``, LoRA rank 16 on attention, 512 px): latents cached vs encoded every step
  (diffusers' ``train_text_to_image_lora.py``), with and without gradient checkpointing, at each ``--train-batches``,
  in each ``--precisions`` (bf16, fp16; fp32 only on CPU). Images/s, steps/s, peak memory, and model FLOPs
  utilisation (FLOPs of one step from ``torch.utils.flop_counter`` × steps/s ÷ the GPU's peak dense 16-bit FLOP/s);
- serving (``serving.engine.Engine``, 512², ``--serve-steps`` steps, guidance on): base only, one adapter, 4 adapters
  mixed in one pass, and the same 4 as one-adapter passes, at each ``--serve-batches``. Images/s and p50 latency.

Every arm runs in every round (``--rounds``), interleaved (training: within each precision, which loads the model
once); figures are medians. Prints the ratios (cached/encode,
checkpointing cost, single/base, mixed/single, mixed/separate) and the published anchors, writes
``gpu_bench.json`` (every raw figure, device, versions, date, arguments, loaded top-level modules) and
``gpu_bench.png`` to ``--out``. Imports neither Ray nor MLflow: GPU machines may have neither.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.metadata
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _gpu_arms import SERVE_KINDS, ServeBench, TrainGroup, serve_args
from _gpu_measure import PEAK_SOURCE, peak_flops
from _sd_scale import (
    SCALES,
    build_pipeline,
    check_param_counts,
    param_counts,
    save_pipeline,
    write_adapters,
    write_dataset,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {  # per scale; each is a command-line option
    "sd15": dict(rounds=3, train_batches=[4, 8], train_images=16, train_epochs=2, serve_batches=[1, 4, 8, 16],
                 serve_steps=25),
    "sdxl": dict(rounds=2, train_batches=[1, 4], train_images=8, train_epochs=1, serve_batches=[1, 4, 8],
                 serve_steps=25),  # ~4x SD 1.5's work per image: fewer rounds and epochs fit one GPU session
    "tiny": dict(rounds=2, train_batches=[1, 2], train_images=2, train_epochs=1, serve_batches=[1, 4], serve_steps=2),
    "tiny-sdxl": dict(rounds=2, train_batches=[1, 2], train_images=2, train_epochs=1, serve_batches=[1, 4],
                      serve_steps=2),
}  # fmt: skip
ANCHORS = {
    "train": "Vertex AI Model Garden SD-1.5 LoRA fine-tune: ~1.5 steps/s at batch 4 on one A100 (512 px, gradient "
    "checkpointing; 1,000 steps ~ 11 min)",
    "serve_lora": "Vertex AI's optimised LoRA server: 4 images at 512x512 in 1.7 s on one A100",
    "serve_base": "diffusers SD-1.5, 50 steps, batch 1: 1.6 s on an A100",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs (a few M params, 64 px): runs on CPU in seconds")
    p.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15",
                   help="SD 1.5 (512 px) or SDXL base (1024 px, two text encoders, time ids)")  # fmt: skip
    p.add_argument("--out", default=None, help="folder for JSON + PNG (default: runs/benchmarks/gpu_bench; with "
                   "--plot: the JSON's own folder)")  # fmt: skip
    p.add_argument("--work-dir", default=None, help="where the model, data and adapters go (default: a temp dir)")
    p.add_argument("--resolution", type=int, default=None, help="image side in px (default 512, sdxl 1024; tiny 64)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds of every arm; figures are medians")
    p.add_argument("--precisions", nargs="+", choices=["bf16", "fp16", "no"], default=None,
                   help="training precisions (default: bf16 fp16 on CUDA, 'no' = fp32 on CPU)")  # fmt: skip
    p.add_argument("--train-batches", type=int, nargs="+", default=None)
    p.add_argument("--train-images", type=int, default=None, help="images in the training set (one epoch)")
    p.add_argument("--train-epochs", type=int, default=None, help="timed epochs per arm and round (+1 warm-up)")
    p.add_argument("--sources", nargs="+", choices=["cached", "encode"], default=["cached", "encode"])
    p.add_argument("--checkpointing", choices=["both", "on", "off"], default="both")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank of training and of the served adapters")
    p.add_argument("--serve-batches", type=int, nargs="+", default=None)
    p.add_argument("--serve-steps", type=int, default=None, help="denoising steps per image (default 25; tiny 2)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (on: 2 UNet rows)")
    p.add_argument("--serve-dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak 16-bit TFLOP/s for a GPU not in the table")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's); 1 on a busy CPU")
    p.add_argument("--plot", metavar="JSON", default=None, help="only redraw the PNG of an earlier run's JSON")
    args = p.parse_args(argv)
    scale = SCALES[(args.arch, args.tiny)]
    for key, value in DEFAULTS[scale.name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.resolution = args.resolution or scale.resolution
    cuda = torch.cuda.is_available()
    if args.precisions is None and cuda:
        args.precisions = ["bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    elif args.precisions is None:
        args.precisions = ["no"]
    if not cuda and set(args.precisions) - {"no"}:
        p.error(f"--precisions {' '.join(args.precisions)}: fp16/bf16 training needs a CUDA GPU; use --precisions no")
    return args


def build_model(args: argparse.Namespace, work: Path, device: torch.device) -> tuple[Path, dict[str, Path], dict]:
    """Build the scale's pipeline with random weights, make 4 random adapters for it, save both; returns the model
    folder, the adapters and the parameter counts (checked against SD 1.5's / SDXL base's for the full scales)."""
    scale = SCALES[(args.arch, args.tiny)]
    start = time.perf_counter()
    pipe = build_pipeline(scale, device=device).to("cpu")  # initialised on the GPU (fast), saved from the CPU
    counts = param_counts(pipe)
    check_param_counts(counts, scale)
    model_dir = work / f"{scale.name}-random"
    adapters = write_adapters(pipe, model_dir, work / "adapters", n=4, rank=args.lora_rank)
    save_pipeline(pipe, model_dir)
    del pipe
    gc.collect()
    torch.cuda.empty_cache()  # a no-op without CUDA
    print(f"built {scale.name} with random weights in {time.perf_counter() - start:.0f}s -> {model_dir}")
    print("  parameters: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in counts.items()))
    return model_dir, adapters, counts


def train_arm(precision: str, key: tuple, runs: list[dict], error: str | None, flops: int | None, peak, memory_kind):
    """One training arm's record: every round's raw figures, medians over rounds × epochs, the largest peak
    memory, FLOPs per step and MFU (None without a known 16-bit peak: CPU, fp32, a GPU not in the table)."""
    batch, source, ckpt = key
    label = "fp32" if precision == "no" else precision  # train.mixed_precision "no" is fp32
    arm = {"name": f"{label}/{source}/{'ckpt' if ckpt else 'no-ckpt'}/b{batch}", "precision": precision}
    arm |= {"source": source, "gradient_checkpointing": ckpt, "batch_size": batch, "rounds": runs}
    arm |= {"memory_kind": memory_kind, "flops_per_step": flops}
    if error is not None:
        return arm | {"error": error}
    arm["images_per_s"] = statistics.median(x for r in runs for x in r["images_per_s"])
    arm["steps_per_s"] = statistics.median(x for r in runs for x in r["steps_per_s"])
    arm["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in runs)
    arm["achieved_tflops"] = flops * arm["steps_per_s"] / 1e12 if flops else None
    arm["mfu"] = arm["achieved_tflops"] * 1e12 / peak if peak and flops else None
    return arm


def run_training(args: argparse.Namespace, model_dir: Path, work: Path, device: torch.device) -> list[dict]:
    """Every training arm, rounds interleaved within each precision; a failing arm records its error."""
    data_dir = write_dataset(work / "data", args.train_images, args.resolution)
    ckpts = {"both": [False, True], "on": [True], "off": [False]}[args.checkpointing]
    keys = [(b, s, c) for b in args.train_batches for s in args.sources for c in ckpts]
    memory_kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_rss_sampled"
    flops: dict[tuple, int | None] = {}  # (batch, source) -> FLOPs per step, the same in every precision
    arms = []
    for precision in args.precisions:
        runs: dict[tuple, list[dict]] = {key: [] for key in keys}
        errors: dict[tuple, str] = {}
        try:
            group = TrainGroup(model_dir, data_dir, precision, args.resolution, args.lora_rank, device)
        except Exception as exc:  # noqa: BLE001 - fp16 may not train yet; the other precisions still run
            print(f"  {precision}: cannot build the training parts: {exc!r}")
            group, errors = None, dict.fromkeys(keys, repr(exc))
        for batch, source, _ in keys if group else []:
            if (batch, source) not in flops:
                try:
                    flops[(batch, source)] = group.flops(source, batch)
                except Exception as exc:  # noqa: BLE001 - no MFU then, the timings still count
                    print(f"  {precision}: counting FLOPs of {source} b{batch} failed: {exc!r}")
        for r in range(args.rounds if group else 0):
            for key in [k for k in keys if k not in errors]:
                try:
                    runs[key].append(group.run(key[1], key[0], key[2], args.train_epochs))
                except Exception as exc:  # noqa: BLE001 - one arm (fp16, out of memory) must not lose the others
                    errors[key] = repr(exc)
                    print(f"  {precision} {key}: failed: {exc!r}")
            print(f"  training {'fp32' if precision == 'no' else precision}: round {r + 1}/{args.rounds} done")
        if group is not None:
            group.close()
        peak = _peak(args, device, precision)
        arms += [train_arm(precision, k, runs[k], errors.get(k), flops.get(k[:2]), peak, memory_kind) for k in keys]
    return arms


def _peak(args: argparse.Namespace, device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    return args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(torch.cuda.get_device_name(device), precision)


def run_serving(args: argparse.Namespace, model_dir: Path, adapters: dict[str, Path], work: Path) -> list[dict]:
    """Every serving arm at every batch size, rounds interleaved; mixed/separate need a batch of >= 4 (adapters)."""
    from serving.engine import Engine

    sa = serve_args(model_dir, adapters, work / "adapter-cache", args.resolution, args.serve_steps, args.guidance,
                    max_batch=max(args.serve_batches), dtype=args.serve_dtype)  # fmt: skip
    bench = ServeBench(Engine.from_args(sa), sorted(adapters))
    plan = [(k, b) for b in args.serve_batches for k in SERVE_KINDS if b >= len(adapters) or k in ("base", "single")]
    for kind, batch in plan:  # warm-up: adapters loaded, kernels chosen for every shape (2 steps)
        bench.call(kind, batch, steps=2)
    seconds: dict[tuple, list[float]] = {key: [] for key in plan}
    for r in range(args.rounds):
        for kind, batch in plan:
            seconds[(kind, batch)].append(bench.call(kind, batch))
        print(f"  serving: round {r + 1}/{args.rounds} done")
    arms = []
    for (kind, batch), secs in seconds.items():
        arm = {"name": f"{kind}/b{batch}", "kind": kind, "batch_size": batch, "seconds": secs}
        arm["images_per_s"] = statistics.median(batch / s for s in secs)
        arm["p50_latency_s"] = statistics.median(secs)  # every request of a call returns when the call does
        arms.append(arm)
    del bench
    gc.collect()
    return arms


def ratios(result: dict) -> dict:
    """The side-by-side ratios of the arms that ran (throughput ratios of images/s; memory of peak bytes)."""
    train = {a["name"]: a for a in result.get("train", []) if "error" not in a}
    serve = {a["name"]: a for a in result.get("serve", [])}
    out: dict[str, dict[str, float]] = {"cached_over_encode": {}, "ckpt_speed": {}, "ckpt_memory": {}}
    for name, arm in train.items():
        prec, source, ckpt, b = name.split("/")
        if source == "cached" and (other := train.get(f"{prec}/encode/{ckpt}/{b}")):
            out["cached_over_encode"][f"{prec}/{ckpt}/{b}"] = arm["images_per_s"] / other["images_per_s"]
        if ckpt == "ckpt" and (other := train.get(f"{prec}/{source}/no-ckpt/{b}")):
            out["ckpt_speed"][f"{prec}/{source}/{b}"] = arm["images_per_s"] / other["images_per_s"]
            if result["device"]["type"] == "cuda":  # on CPU the figure is the whole process's RSS: no ratio
                out["ckpt_memory"][f"{prec}/{source}/{b}"] = arm["peak_memory_bytes"] / other["peak_memory_bytes"]
    for key, num, den in (("single_over_base", "single", "base"), ("mixed_over_single", "mixed", "single"),
                          ("mixed_over_separate", "mixed", "separate")):  # fmt: skip
        out[key] = {
            f"b{a['batch_size']}": a["images_per_s"] / serve[f"{den}/b{a['batch_size']}"]["images_per_s"]
            for a in serve.values()
            if a["kind"] == num and f"{den}/b{a['batch_size']}" in serve
        }
    return out


def print_report(result: dict) -> None:
    print(f"\n{result['scale']} on {result['device']['name']} ({result['date']})")
    if result.get("train"):
        print("training (median over rounds x epochs):")
        print(f"  {'arm':28s} {'img/s':>8s} {'steps/s':>8s} {'peak GiB':>9s} {'GFLOP/step':>11s} {'MFU':>6s}")
        for a in result["train"]:
            if "error" in a:
                print(f"  {a['name']:28s} failed: {a['error'][:90]}")
                continue
            mfu = f"{a['mfu']:.1%}" if a["mfu"] is not None else "n/a"
            gf = f"{a['flops_per_step'] / 1e9:.1f}" if a["flops_per_step"] else "n/a"
            mem = a["peak_memory_bytes"] / 2**30
            print(f"  {a['name']:28s} {a['images_per_s']:8.2f} {a['steps_per_s']:8.2f} {mem:9.2f} {gf:>11s} {mfu:>6s}")
        print(f"  peak memory: {result['train'][0]['memory_kind']}; MFU vs {result['device']['peak_source']}")
    if result.get("serve"):
        print("serving (median over rounds):")
        for a in result["serve"]:
            print(f"  {a['name']:14s} {a['images_per_s']:8.2f} img/s   p50 {a['p50_latency_s']:7.3f} s")
    for key, values in result["ratios"].items():
        if values:
            print(f"{key:20s} " + "  ".join(f"{k} {v:.2f}" for k, v in values.items()))
    if not result["tiny"] and result.get("arch", "sd15") == "sd15":  # the anchors are SD-1.5 figures
        print_anchors(result)


def print_anchors(result: dict) -> None:
    """The published figures next to this run's closest arms (other hardware and settings: orientation only)."""
    train = {a["name"]: a for a in result.get("train", []) if "error" not in a}
    serve = {a["name"]: a for a in result.get("serve", [])}
    device, steps = result["device"]["name"], result["args"]["serve_steps"]
    print("anchors (published, other hardware; for orientation, not ratios):")
    print(f"  {ANCHORS['train']}")
    for prec in result["args"]["precisions"]:
        if arm := train.get(f"{prec}/cached/ckpt/b4"):
            print(f"    here: {arm['steps_per_s']:.2f} steps/s ({prec}, cached latents, checkpointing, b4) on {device}")
    print(f"  {ANCHORS['serve_lora']}")
    if arm := serve.get("single/b4"):
        print(f"    here: {arm['p50_latency_s']:.2f} s for 4 images, one adapter, {steps} steps, on {device}")
    print(f"  {ANCHORS['serve_base']}")
    if arm := serve.get("base/b1"):
        print(f"    here: {arm['p50_latency_s']:.2f} s at {steps} steps, base model, batch 1, on {device}")


def plot(result: dict, path: Path) -> Path | None:
    """Training images/s per arm (bars) and serving images/s per batch size (lines) as a PNG; None without
    matplotlib (GPU machines may lack it: redraw later with ``--plot JSON``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        print("matplotlib is not installed: no PNG (redraw with --plot <json> where it is)")
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    train = [a for a in result.get("train", []) if "error" not in a]
    left.barh([a["name"] for a in train], [a["images_per_s"] for a in train], color="tab:blue")
    left.set_xlabel("training images/s")
    left.invert_yaxis()
    for kind in SERVE_KINDS:
        arms = [a for a in result.get("serve", []) if a["kind"] == kind]
        if arms:
            right.plot([a["batch_size"] for a in arms], [a["images_per_s"] for a in arms], marker="o", label=kind)
    right.set_xscale("log", base=2)
    right.set_xticks(sorted({a["batch_size"] for a in result.get("serve", [])}), minor=False)
    right.xaxis.set_major_formatter(ScalarFormatter())
    right.set_xlabel("requests per generate() call")
    right.set_ylabel("serving images/s")
    right.legend()
    fig.suptitle(f"lorafleet gpu_bench ({result['scale']}, {result['resolution']} px) on {result['device']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for dist in ("diffusers", "peft", "transformers", "accelerate"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:  # redraw a JSON (e.g. copied from a GPU machine) next to it, unless --out says where
        source = Path(args.plot)
        out = Path(args.out) if args.out else source.parent
        out.mkdir(parents=True, exist_ok=True)
        png = plot(json.loads(source.read_text()), out / "gpu_bench.png")
        if png:
            print(f"wrote {png}")
        return 0 if png else 1
    out = Path(args.out or REPO / "runs" / "benchmarks" / "gpu_bench")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    if device.type == "cpu":
        print("CPU: training in fp32 only (fp16/bf16 need CUDA); MFU is n/a")
    scale = SCALES[(args.arch, args.tiny)]
    result: dict = {"benchmark": "gpu_bench", "scale": scale.name, "arch": args.arch, "tiny": args.tiny}
    result |= {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "args": vars(args)}
    result |= {"resolution": args.resolution, "versions": _versions(), "anchors": ANCHORS}
    peaks = {p: peak_flops(name, p) for p in ("bf16", "fp16")} if device.type == "cuda" else {}
    result["device"] = {"type": device.type, "name": name, "peak_flops": peaks, "peak_source": PEAK_SOURCE}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        model_dir, adapters, result["params"] = build_model(args, work, device)
        if not args.skip_train:
            result["train"] = run_training(args, model_dir, work, device)
        if not args.skip_serve:
            result["serve"] = run_serving(args, model_dir, adapters, work)
    result["ratios"] = ratios(result)
    result["wall_s"] = time.perf_counter() - started
    print_report(result)
    png = plot(result, out / "gpu_bench.png")
    result["plot"] = str(png) if png else None
    result["loaded_modules"] = sorted({m.split(".")[0] for m in sys.modules})  # proves: no ray, no mlflow
    (out / "gpu_bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out / 'gpu_bench.json'}" + (f" and {png}" if png else ""))
    failed = [a["name"] for a in result.get("train", []) if "error" in a and a["precision"] != "fp16"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
