"""Serving throughput on loopback: dynamic batching vs none vs the raw engine, and the engine's LoRA fast paths.

    python benchmarks/serve_throughput.py                     # toy model, 20 steps, 64x64, ~8 min (make bench-serve)
    python benchmarks/serve_throughput.py --seconds 5         # quicker, noisier
    python benchmarks/serve_throughput.py --engine-only       # only (e), the engine's fast paths, ~2 min
    python benchmarks/serve_throughput.py --cache-only --seconds 4 --concurrency 8   # only (f), ~5 min

(a) the Serve app with batching on (max_batch_size 8);
(b) the same app with max_batch_size 1;
(c) the raw engine called in-process, no HTTP, no Ray, driven by the same closed loop of ``concurrency`` clients
    (simulated: each pass takes the oldest min(concurrency, 8) waiting requests), so its latencies are measured as
    (a)'s are: from a request's submission to its result, waiting included;
(d) traffic spread over 4 adapters at concurrency 16: mixed-adapter batches vs one adapter per UNet pass;
(e) the raw engine's LoRA fast paths, 8 images per call: base only, one adapter (merged weights), the same
    unmerged (PEFT's active adapter), 4 adapters mixed (batched LoRA),
    4 adapters mixed through PEFT's per-sample routing (the old path), and the same 4 as one-adapter passes;
(f) the serving-throughput cost of generation records (serving/records.py: every request a trace, written to a
    sqlite store by the replica's writer thread) and of the response cache (serving/response_cache.py), one app per
    arm, each the benchmark app plus its config overrides (``OVERRIDE_ARMS``): baseline (both off); records on;
    records on with 1 request in 10 written as a trace (``records.sample_rate`` 0.1: the rest only counted);
    cache on with all-miss traffic (every seed unique: the pure overhead of key + store); records and cache on, all
    miss; both on with a repeat-heavy mix (3 requests in 4 from a pool of 16 seeds: the hit benefit). The same load
    generator drives every arm, at ``--concurrency``.
(a)/(c) alternate round by round, as do the arms of (e) and of (f) (order rotated per round); (b) and (d) run their
``--rounds`` rounds back to back per deployment. Every arm is the median of ``--rounds`` rounds. A closed-loop
load generator (``concurrency`` clients, each sending its next request when the last returns) runs each HTTP
variant for ``--seconds`` after a warm-up; the replicas and the raw engine use ``--cpus`` torch threads (default
1). Prints images/s, p50/p99 latency and the ratios; writes ``runs/benchmarks/serve_throughput.json`` and ``.png``
(``--engine-only``: (e) alone, to ``runs/benchmarks/serve_fast_paths.json``, no plot; ``--cache-only``: (f) alone, to
``runs/benchmarks/serve_cache.json``, no plot). Seeds are unique across every request of a run unless an arm asks
for repeats, so the response cache (on by default) never answers the other variants. With an even ``--rounds`` the
median is the upper of the two middle rounds (a whole round is kept, so its latencies match its throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import torch

from serving.config import ServeArgs
from serving.engine import Engine, ImageRequest
from training.cluster_state import private_temp_dir
from training.configuration import validate_values

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a sks background"
ADAPTERS = ["ad0", "ad1", "ad2", "ad3"]
_SEEDS = itertools.count(10**6)  # unique seeds for a whole run: no variant is answered from the response cache
REPEAT_POOL = 16  # seeds 0..15: the repeated requests of (f)'s repeat-heavy mix


def unique_seed(i: int) -> int:
    """A seed no other request of this run used: a response-cache miss whenever the cache is on."""
    return next(_SEEDS)


def repeat_heavy_seed(i: int) -> int:
    """Requests 1-3 of every 4 take one of ``REPEAT_POOL`` seeds (hits once seen), the 4th a unique one (a miss)."""
    return i % REPEAT_POOL if i % 4 else next(_SEEDS)


# (f): one app per arm = the benchmark app + one list of dotted overrides, driven with the arm's seeds. "{records}"
# stands for the arm's own records store (sqlite under the run's temp folder: traces really written, by the replica's
# writer thread, while it generates). Ratios are against "baseline" (neither records nor cache).
_OFF = ["records.enabled=false", "response_cache.enabled=false"]
_RECORDS = ["records.enabled=true", "records.tracking_uri={records}", "records.sample_rate=1.0"]
OVERRIDE_ARMS: dict[str, tuple[list[str], Callable[[int], int]]] = {
    "baseline": (_OFF, unique_seed),
    "records_on": ([*_RECORDS, "response_cache.enabled=false"], unique_seed),
    "records_sampled": ([*_RECORDS[:2], "records.sample_rate=0.1", "response_cache.enabled=false"], unique_seed),
    "cache_on_all_miss": (["records.enabled=false", "response_cache.enabled=true"], unique_seed),
    "records_and_cache": ([*_RECORDS, "response_cache.enabled=true"], unique_seed),
    "both_on_repeats": ([*_RECORDS, "response_cache.enabled=true"], repeat_heavy_seed),
}


def make_adapters(root: Path) -> dict[str, str]:
    from training.families import load_pipeline
    from training.toy_world.adapters import random_adapter

    pipe = load_pipeline(REPO / "models" / "toy-sd", device="cpu")
    base = REPO / "models" / "toy-sd"
    return {n: str(random_adapter(pipe, base, root / n, seed=i, rank=8, std=0.05)) for i, n in enumerate(ADAPTERS)}


def serve_args(
    adapters: dict[str, str],
    cache: Path,
    max_batch_size: int = 8,
    mixed: bool = True,
    wait_s: float = 0.02,
    cpus: int = 1,
    overrides: list[str] | None = None,
) -> ServeArgs:
    """The benchmark app over ``adapters``; ``overrides`` are dotted ``key=value`` strings on top."""
    values = {
        "base_model": str(REPO / "models" / "toy-sd"),
        "adapters": adapters,
        "adapter_roots": sorted({str(Path(p).parent) for p in adapters.values()}),
        "champion": {"model": None},
        "default_model": "ad0",
        "adapter_cache_dir": str(cache),
        "defaults": {"steps": 20, "guidance": 4.0, "size": 64},
        "limits": {"max_n": 1},
        "batching": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": wait_s, "mixed_adapters": mixed},
        "deployment": {
            "num_cpus": cpus,
            "max_ongoing_requests": 32,
            "max_queued_requests": 64,
            "request_timeout_s": 120,
        },
        "api_key_env": "LORAFLEET_BENCH_UNSET",
        # not measured here: their two one-replica deployments would only add processes (and memory) to every arm
        "feedback": {"enabled": False},
        "batches": {"enabled": False},
    }
    return validate_values(ServeArgs, values, overrides)


def summary(latencies: list[float], images: int, wall: float) -> dict:
    lat = sorted(latencies)
    return {
        "images_per_s": images / wall,
        "p50_s": statistics.median(lat),
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "requests": len(lat),
    }


async def load(
    url: str, concurrency: int, seconds: float, models: list[str], seeds: Callable[[int], int] = unique_seed
) -> dict:
    """Closed loop: each client sends one request after another; requests cycle through ``models``; request i has
    seed ``seeds(i)``."""
    latencies: list[float] = []
    failures = 0
    counter = iter(range(10**9))

    async def client(http: httpx.AsyncClient, stop: float, record: bool) -> None:
        nonlocal failures
        while time.perf_counter() < stop:
            i = next(counter)
            body = {"prompt": PROMPT, "model": models[i % len(models)], "seed": seeds(i)}
            start = time.perf_counter()
            r = await http.post("/v1/images/generations", json=body)
            if r.status_code != 200:
                failures += 1
            elif record:
                latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        warm = time.perf_counter() + min(3.0, seconds / 3)
        await asyncio.gather(*(client(http, warm, False) for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(client(http, start + seconds, True) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return summary(latencies, len(latencies), wall) | {"failures": failures}


def raw_engine(engine: Engine, concurrency: int, seconds: float) -> dict:
    """(c): the engine in this process under a simulated closed loop of ``concurrency`` clients: each pass takes the
    oldest min(concurrency, 8) waiting requests; a request's latency runs from its submission (when its client's
    previous one returned) to the end of its pass, as the HTTP load generator measures it."""
    from collections import deque

    batch, seed = min(concurrency, 8), 0

    def one_pass(waiting: deque) -> list[float]:
        nonlocal seed
        taken = [waiting.popleft() for _ in range(batch)]
        engine.generate([engine.prepare(ImageRequest(PROMPT, model="ad0", seed=seed + i)) for i in range(batch)])
        seed += batch
        done = time.perf_counter()
        waiting.extend([done] * batch)
        return [done - t for t in taken]

    one_pass(deque([time.perf_counter()] * concurrency))  # warm-up
    waiting = deque([time.perf_counter()] * concurrency)
    latencies, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        latencies += one_pass(waiting)
    return summary(latencies, len(latencies), time.perf_counter() - start)


def fast_path_arms(adapters: dict[str, str], cache: Path, cpus: int, rounds: int, passes: int) -> dict:
    """(e): each arm draws 8 one-image requests per ``generate`` call, ``passes`` calls per round; arms rotate
    within each round. A request's latency is its call's wall time (all 8 are submitted together), on every arm."""
    mixed = ADAPTERS * 2
    engines = {
        "batched": Engine.from_args(serve_args(adapters, cache, cpus=cpus)),
        "peft": Engine.from_args(serve_args(adapters, cache, cpus=cpus, overrides=["speed.lora_batching=peft"])),
        "split": Engine.from_args(serve_args(adapters, cache, cpus=cpus, mixed=False)),
        "unmerged": Engine.from_args(
            serve_args(adapters, cache, cpus=cpus, overrides=["speed.merge_single_adapter=false"])
        ),
    }
    arms = {
        "base_only": ("batched", ["base"] * 8),
        "single_adapter": ("batched", ["ad0"] * 8),
        "single_unmerged": ("unmerged", ["ad0"] * 8),
        "mixed_batched": ("batched", mixed),
        "mixed_peft_routing": ("peft", mixed),
        "one_adapter_passes": ("split", mixed),
    }
    seed = 0

    def one_round(engine: Engine, models: list[str]) -> dict:
        nonlocal seed
        latencies, images, start = [], 0, time.perf_counter()
        for _ in range(passes):
            reqs = [engine.prepare(ImageRequest(PROMPT, model=m, seed=seed + i)) for i, m in enumerate(models)]
            seed += len(models)
            t0 = time.perf_counter()
            engine.generate(reqs)
            latencies += [time.perf_counter() - t0] * len(reqs)
            images += len(reqs)
        return summary(latencies, images, time.perf_counter() - start)

    for key, models in arms.values():  # warm-up: every adapter loaded, every path run once
        one_round(engines[key], models)
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(one_round(engines[arms[name][0]], arms[name][1]))
    out = {name: median_run(rs) for name, rs in runs.items()}
    out["pass_kinds"] = {k: dict(e.lora.passes) for k, e in engines.items()}
    return out


def median_run(runs: list[dict]) -> dict:
    """The run with the median images/s, with every run's figure kept."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    return ordered[len(ordered) // 2] | {"rounds_images_per_s": [r["images_per_s"] for r in runs]}


def measure(
    url: str, concurrency: int, seconds: float, models: list[str], seeds: Callable[[int], int] = unique_seed
) -> dict:
    """One closed-loop run against the app at ``url``, with the replica's pass and response-cache figures for it."""
    before = httpx.get(f"{url}/admin/stats", timeout=30).raise_for_status().json()
    result = asyncio.run(load(url, concurrency, seconds, models, seeds))
    after = httpx.get(f"{url}/admin/stats", timeout=30).raise_for_status().json()
    return result | pass_stats(before, after) | cache_stats(before, after)


def cache_stats(before: dict, after: dict) -> dict:
    """Response-cache hits / (hits + misses) between two /admin/stats snapshots (warm-up included); None when the
    cache was off or never asked."""
    b, e = before.get("response_cache") or {}, after.get("response_cache") or {}
    hits, misses = e.get("hits", 0) - b.get("hits", 0), e.get("misses", 0) - b.get("misses", 0)
    return {"cache_hit_ratio": hits / (hits + misses) if hits + misses else None}


def pass_stats(before: dict, after: dict) -> dict:
    """Mean images per UNet pass and mean pass time between two /admin/stats snapshots (warm-up included)."""
    sizes = {int(k): v - before["batch_images"].get(k, 0) for k, v in after["batch_images"].items()}
    passes = sum(sizes.values())
    seconds = after["mean_pass_s"] * after["passes"] - before["mean_pass_s"] * before["passes"]
    return {
        "mean_batch_images": sum(k * v for k, v in sizes.items()) / max(1, passes),
        "mean_pass_s": seconds / max(1, passes),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(args: ServeArgs, name: str, port: int, prefix: str = "/"):
    from ray import serve

    from serving.app import build_app

    serve.run(build_app(args), name=name, route_prefix=prefix)
    return f"http://127.0.0.1:{port}{prefix.rstrip('/')}"


@contextlib.contextmanager
def ray_serve(cpus: int) -> Iterator[int]:
    """A private Ray instance on loopback with Serve's HTTP proxy; yields the proxy's port. ``cpus`` logical CPUs:
    (f) holds one replica per arm at once (idle between their rounds)."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    port = free_port()
    # a private instance (never the "latest cluster" another `ray start` on the machine left in /tmp/ray)
    ray.init(address="local", _temp_dir=str(private_temp_dir()), num_cpus=cpus, _node_ip_address="127.0.0.1",
             include_dashboard=False, log_to_driver=False)  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def override_arms(
    adapters: dict[str, str], cache: Path, port: int, a: argparse.Namespace, arms: dict = OVERRIDE_ARMS
) -> dict:
    """(f): every arm of ``arms`` (name -> (dotted overrides, seeds)) deployed side by side as its own app, all
    driven by the same closed loop at each ``--concurrency`` level, arms alternating round by round (order rotated
    per round); the median round of each arm is kept."""
    from ray import serve

    def concrete(name: str, overrides: list[str]) -> list[str]:
        return [o.replace("{records}", f"sqlite:///{cache / f'records-{name}.db'}") for o in overrides]

    urls = {
        name: served(serve_args(adapters, cache, wait_s=a.batch_wait, cpus=a.cpus, overrides=concrete(name, overrides)),
                     name, port, f"/{name}")
        for name, (overrides, _) in arms.items()
    }  # fmt: skip
    names, out = list(arms), {name: {} for name in arms}
    try:
        for c in a.concurrency:
            runs: dict[str, list[dict]] = {name: [] for name in names}
            for r in range(a.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    runs[name].append(measure(urls[name], c, a.seconds, ["ad0"], arms[name][1]))
            for name in names:
                out[name][c] = median_run(runs[name])
                print(f"(f) {name}, concurrency {c}: {out[name][c]}", flush=True)
    finally:
        for name in names:
            serve.delete(name)
    return out


def report_arms(f: dict, levels: list[int]) -> dict[str, float]:
    """Print (f)'s table and its ratios against the baseline (records and cache off); returns the ratios."""
    print("\n(f) generation records and response cache: images/s (p50 / p99 latency s) [hit ratio], median of rounds")
    print(f"{'arm':<20}" + "".join(f"{'c=' + str(c):>32}" for c in levels))
    for name, by_level in f.items():
        cells = []
        for c in levels:
            r, ratio = by_level[c], by_level[c]["cache_hit_ratio"]
            hit = "  -  " if ratio is None else f"{ratio:.2f}"
            cells.append(f"{r['images_per_s']:>8.2f} ({r['p50_s']:.2f}/{r['p99_s']:.2f}) [{hit}]")
        print(f"{name:<20}" + "".join(f"{cell:>32}" for cell in cells))
    ratios = {}
    for c in levels:
        off = f["baseline"][c]["images_per_s"]
        for name in f:
            if name != "baseline":
                ratios[f"f {name} / baseline at c={c}"] = f[name][c]["images_per_s"] / off
    for name, value in ratios.items():
        print(f"  {name:<42} {value:5.3f}")
    return ratios


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per variant and concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=3, help="rounds of every arm; the median is kept")
    p.add_argument("--passes", type=int, default=3, help="(e): generate calls of 8 images per arm and round")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--engine-only", action="store_true", help="run (e) only: no Ray, no HTTP")
    only.add_argument("--cache-only", action="store_true", help="run (f) only: records and response cache arms")
    p.add_argument("--cpus", type=int, default=1, help="CPUs (torch threads) of the replica and of the raw engine")
    p.add_argument("--batch-wait", type=float, default=0.02, help="batching.batch_wait_timeout_s of (a), (d), (f)")
    p.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "serve_throughput.json"))
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    adapters = make_adapters(tmp)
    cache = tmp / "cache"
    torch.set_num_threads(a.cpus)
    cpus = max(2, len(OVERRIDE_ARMS) * a.cpus)  # logical: (f) holds one replica per arm
    if a.cache_only:
        with ray_serve(cpus) as port:
            f = override_arms(adapters, cache, port, a)
        ratios = report_arms(f, a.concurrency)
        out = Path(a.out).with_name("serve_cache.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"f_cache": f, "ratios": ratios}, indent=2) + "\n")
        print(f"wrote {out}")
        return {"f_cache": f}
    results: dict = {"a_batching": {}, "b_no_batching": {}, "c_raw_engine": {}, "d_mixed": {}, "d_one_per_pass": {}}
    results["e_fast_paths"] = fast_path_arms(adapters, cache, a.cpus, a.rounds, a.passes)
    report_fast_paths(results["e_fast_paths"])
    if a.engine_only:
        out = Path(a.out).with_name("serve_fast_paths.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results["e_fast_paths"], indent=2) + "\n")
        print(f"wrote {out}")
        return results
    engine = Engine.from_args(serve_args(adapters, cache, cpus=a.cpus))

    from ray import serve

    with ray_serve(cpus) as port:
        # (a) and (c) alternate, round by round, so the machine's drift hits both alike
        url = served(serve_args(adapters, cache, wait_s=a.batch_wait, cpus=a.cpus), "bench", port)
        for c in a.concurrency:
            raw, served_runs = [], []
            for _ in range(a.rounds):
                raw.append(raw_engine(engine, c, a.seconds))
                served_runs.append(measure(url, c, a.seconds, ["ad0"]))
            results["c_raw_engine"][c], results["a_batching"][c] = median_run(raw), median_run(served_runs)
            print(f"(c) raw engine, concurrency {c}: {results['c_raw_engine'][c]}", flush=True)
            print(f"(a) batching, concurrency {c}: {results['a_batching'][c]}", flush=True)
        serve.delete("bench")
        variants = [
            ("b_no_batching", serve_args(adapters, cache, max_batch_size=1, cpus=a.cpus), a.concurrency, ["ad0"]),
            ("d_mixed", serve_args(adapters, cache, wait_s=a.batch_wait, cpus=a.cpus), [16], ADAPTERS),
            (
                "d_one_per_pass",
                serve_args(adapters, cache, mixed=False, wait_s=a.batch_wait, cpus=a.cpus),
                [16],
                ADAPTERS,
            ),
        ]
        for key, args, levels, models in variants:
            url = served(args, "bench", port)
            for c in levels:
                results[key][c] = median_run([measure(url, c, a.seconds, models) for _ in range(a.rounds)])
                print(f"({key}) concurrency {c}: {results[key][c]}", flush=True)
            serve.delete("bench")
        results["f_cache"] = override_arms(adapters, cache, port, a)
    report(results, a.concurrency, Path(a.out))
    return results


def report_fast_paths(e: dict) -> dict[str, float]:
    """Print (e)'s table and its ratios against the targets; returns the ratios."""
    arms = [k for k in e if k != "pass_kinds"]
    print("\n(e) engine fast paths, 8 images per call: images/s (p50 / p99 latency s), rounds")
    for name in arms:
        r = e[name]
        rounds = " ".join(f"{x:.2f}" for x in r["rounds_images_per_s"])
        print(f"  {name:<20}{r['images_per_s']:>8.2f} ({r['p50_s']:.2f}/{r['p99_s']:.2f})   [{rounds}]")
    ips = {name: e[name]["images_per_s"] for name in arms}
    ratios = {
        "mixed batched / single adapter": (ips["mixed_batched"] / ips["single_adapter"], 0.9),
        "single adapter / base only": (ips["single_adapter"] / ips["base_only"], 0.95),
        "single merged / single unmerged (PEFT)": (ips["single_adapter"] / ips["single_unmerged"], None),
        "mixed batched / mixed PEFT routing": (ips["mixed_batched"] / ips["mixed_peft_routing"], None),
        "mixed batched / one-adapter passes": (ips["mixed_batched"] / ips["one_adapter_passes"], None),
    }
    for name, (value, target) in ratios.items():
        verdict = "" if target is None else f" (target >= {target:.2f}: {'met' if value >= target else 'MISSED'})"
        print(f"  {name:<42} {value:5.3f}{verdict}")
    print(f"  pass kinds per engine: {e['pass_kinds']}")
    return {name: value for name, (value, _) in ratios.items()}


def report(results: dict, levels: list[int], out: Path) -> None:
    ips = {k: {c: v["images_per_s"] for c, v in results[k].items()} for k in ("a_batching", "b_no_batching",
           "c_raw_engine", "d_mixed", "d_one_per_pass")}  # fmt: skip
    print("\nimages/s (p50 / p99 latency s)")
    print(f"{'variant':<16}" + "".join(f"{'c=' + str(c):>24}" for c in levels))
    for key in ("a_batching", "b_no_batching", "c_raw_engine"):
        row = "".join(
            f"{results[key][c]['images_per_s']:>8.2f} ({results[key][c]['p50_s']:.2f}/{results[key][c]['p99_s']:.2f})"
            for c in levels
        )
        print(f"{key:<16}{row}")
    top = max(levels)
    ratios = {
        f"a/b at c={top}": ips["a_batching"][top] / ips["b_no_batching"][top],
        **{f"a/c at c={c}": ips["a_batching"][c] / ips["c_raw_engine"][c] for c in levels},
        "d mixed / one-adapter-per-pass at c=16": ips["d_mixed"][16] / ips["d_one_per_pass"][16],
        **{f"e {k}": v for k, v in report_fast_paths(results["e_fast_paths"]).items()},
        **report_arms(results["f_cache"], levels),
    }
    targets = {f"a/b at c={top}": 1.5, "d mixed / one-adapter-per-pass at c=16": 1.3}
    print("\nratios")
    for name, value in ratios.items():
        target = targets.get(name, 0.85 if name.startswith("a/c") else None)
        verdict = "" if target is None else f" (target >= {target:.2f}: {'met' if value >= target else 'MISSED'})"
        print(f"  {name:<42} {value:5.2f}{verdict}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "ratios": ratios}, indent=2) + "\n")
    plot(results, levels, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


def plot(results: dict, levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("a_batching", "(a) Serve, batching"),
        ("b_no_batching", "(b) Serve, batch 1"),
        ("c_raw_engine", "(c) raw engine"),
    ):
        ax.plot(levels, [results[key][c]["images_per_s"] for c in levels], marker="o", label=label)
    ax.set(xlabel="concurrent clients", ylabel="images/s", xscale="log", title="toy SD, 20 steps, 64x64, 2 CPU cores")
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
