"""Serving under load and faults, on loopback: overload shedding, a memory soak and a replica killed under load.

    python benchmarks/serve_reliability.py                       # all three, ~9 min (make reliability)
    python benchmarks/serve_reliability.py --only overload --seconds 20 --soak-seconds 60   # quicker

1. capacity: a closed loop of ``--concurrency`` clients against one generator replica measures what it serves (req/s).
2. overload: an open loop sends requests at 2x that rate for ``--seconds`` (a bounded count). The server must shed
   with 503 + Retry-After (bounded queue: ``max_ongoing_requests`` + ``max_queued_requests``), every accepted
   request must finish within ``request_timeout_s`` (p99 figure), and nothing may fail otherwise.
3. soak: ``--soak-seconds`` (default 300) of ``--concurrency`` clients back to back: the replica works all the time
   and nothing is shed (the clients fit its ``max_ongoing_requests``). Its RSS is sampled every 10 s; the growth
   after the first minute is the figure (warm-up allocations excluded).
4. replica kill: two replicas, an open loop at 0.8x one replica's capacity, half the requests sent raw (httpx, no
   retries) and half through the SDK's ``AsyncClient`` (retries on 503 with Retry-After); one replica is SIGKILLed
   after ``--kill-after`` s. Figures: failed requests of each kind, the longest request, the time until Serve
   runs two replicas again.

Prints each figure and writes ``runs/benchmarks/serve_reliability.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import PROMPT, REPO, free_port, make_adapters, serve_args  # noqa: E402

from serving.config import ServeArgs  # noqa: E402
from training.cluster_state import private_temp_dir  # noqa: E402

APP = "rel"
TIMEOUT_S = 30.0


def reliability_args(adapters: dict[str, str], cache: Path, replicas: int = 1) -> ServeArgs:
    """The throughput benchmark's app with a bounded queue (16 + 16) and a 30 s timeout."""
    return serve_args(
        adapters,
        cache,
        overrides=[
            f"deployment.num_replicas={replicas}",
            "batching.max_concurrent_batches=2",
            "deployment.max_ongoing_requests=16",
            "deployment.max_queued_requests=16",
            f"deployment.request_timeout_s={TIMEOUT_S}",
            "deployment.retry_after_s=1",
        ],
    )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def replica_pids(app: str = APP) -> list[int]:
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if f"ServeReplica:{app}:Generator" in cmd:
            pids.append(proc.pid)
    return sorted(pids)


def rss_mb(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            out[pid] = psutil.Process(pid).memory_info().rss / 2**20
    return out


async def closed_loop(url: str, concurrency: int, seconds: float, warm_s: float = 5) -> dict:
    done, failed = 0, 0
    counter = iter(range(10**9))

    async def client(http: httpx.AsyncClient, stop: float, record: bool) -> None:
        nonlocal done, failed
        while time.perf_counter() < stop:
            i = next(counter)
            r = await http.post("/v1/images/generations", json={"prompt": PROMPT, "seed": i})
            if record:
                done, failed = done + (r.status_code == 200), failed + (r.status_code != 200)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as http:
        warm = time.perf_counter() + warm_s
        await asyncio.gather(*(client(http, warm, False) for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(client(http, start + seconds, True) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"req_per_s": done / wall, "requests": done, "failed": failed, "concurrency": concurrency}


async def open_loop(url: str, rate: float, seconds: float, sdk_share: float = 0.0, on_tick=None) -> dict:
    """Send ``rate`` requests/s (evenly spaced) for ``seconds`` whatever the answers; a ``sdk_share`` of them
    through the SDK's AsyncClient (with its retries), the rest raw. ``on_tick(elapsed)`` runs every second."""
    from serving.client import AsyncClient, LorafleetError

    results: list[dict] = []
    total = int(rate * seconds)

    async def raw(http: httpx.AsyncClient, i: int) -> None:
        start = time.perf_counter()
        try:
            r = await http.post("/v1/images/generations", json={"prompt": PROMPT, "seed": i})
            rec = {"kind": "raw", "status": r.status_code, "retry_after": r.headers.get("retry-after")}
        except httpx.HTTPError as exc:
            rec = {"kind": "raw", "status": type(exc).__name__, "retry_after": None}
        results.append(rec | {"t": start, "latency": time.perf_counter() - start})

    async def sdk(client: AsyncClient, i: int) -> None:
        start = time.perf_counter()
        try:
            await client.generate(PROMPT, seed=i)
            status: int | str = 200
        except LorafleetError as exc:
            status = f"{type(exc).__name__}({exc.status})"
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        results.append({"kind": "sdk", "status": status, "t": start, "latency": time.perf_counter() - start})

    limits = httpx.Limits(max_connections=total + 8, max_keepalive_connections=64)
    async with (
        httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S + 30, limits=limits) as http,
        AsyncClient(url, timeout=TIMEOUT_S + 30, retries=6, backoff_s=0.5, max_backoff_s=4) as client,
    ):
        start = time.perf_counter()
        tasks, next_tick = [], 1.0
        for i in range(total):
            due = start + i / rate
            while (now := time.perf_counter()) < due:
                await asyncio.sleep(min(due - now, 0.05))
                if on_tick and now - start >= next_tick:
                    on_tick(now - start)
                    next_tick += 1.0
            use_sdk = sdk_share > 0 and (i % round(1 / sdk_share) == 0)
            tasks.append(asyncio.create_task(sdk(client, i) if use_sdk else raw(http, i)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return {"results": results, "wall_s": wall, "sent": total, "start": start}


def overload(url: str, capacity: float, seconds: float) -> dict:
    pids = replica_pids()
    before = rss_mb(pids)
    run = asyncio.run(open_loop(url, 2 * capacity, seconds))
    res = run["results"]
    ok = [r["latency"] for r in res if r["status"] == 200]
    shed = [r for r in res if r["status"] == 503]
    other = [r for r in res if r["status"] not in (200, 503)]
    after = rss_mb(pids)
    out = {
        "offered_req_per_s": 2 * capacity,
        "sent": run["sent"],
        "accepted": len(ok),
        "shed_503": len(shed),
        "shed_with_retry_after": sum(1 for r in shed if r["retry_after"]),
        "other": len(other),
        "other_statuses": sorted({str(r["status"]) for r in other}),
        "accepted_req_per_s": len(ok) / run["wall_s"],
        "p50_accepted_s": percentile(ok, 0.5),
        "p99_accepted_s": percentile(ok, 0.99),
        "max_accepted_s": max(ok) if ok else None,
        "p99_shed_s": percentile([r["latency"] for r in shed], 0.99),
        "timeout_s": TIMEOUT_S,
        "replica_rss_mb_before": sum(before.values()),
        "replica_rss_mb_after": sum(after.values()),
    }
    out["ok"] = bool(
        out["shed_503"] > 0
        and out["shed_with_retry_after"] == out["shed_503"]
        and out["other"] == 0
        and out["p99_accepted_s"] is not None
        and out["p99_accepted_s"] <= TIMEOUT_S
    )
    return out


def soak(url: str, concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients back to back (the replica busy all the time, the queue never full) for ``seconds``;
    the replica's RSS sampled every 10 s."""
    pids = replica_pids()
    samples: list[tuple[float, float]] = [(0.0, sum(rss_mb(pids).values()))]

    async def run() -> dict:
        start = time.perf_counter()

        async def sampler() -> None:
            while True:
                await asyncio.sleep(10)
                samples.append((time.perf_counter() - start, sum(rss_mb(pids).values())))

        task = asyncio.create_task(sampler())
        try:
            return await closed_loop(url, concurrency, seconds, warm_s=0)
        finally:
            task.cancel()

    load = asyncio.run(run())
    samples.append((seconds, sum(rss_mb(pids).values())))
    settled = [mb for t, mb in samples if t >= 60] or [samples[-1][1]]
    growth = samples[-1][1] - settled[0]
    minutes = max((samples[-1][0] - 60) / 60, 1e-9)
    return {
        "seconds": seconds,
        "concurrency": concurrency,
        "req_per_s": load["req_per_s"],
        "accepted": load["requests"],
        "failed": load["failed"],
        "rss_mb_start": samples[0][1],
        "rss_mb_at_60s": settled[0],
        "rss_mb_end": samples[-1][1],
        "rss_growth_after_60s_mb": growth,
        "rss_growth_mb_per_min": growth / minutes,
        "rss_samples": samples,
    }


def replica_kill(url: str, capacity: float, seconds: float, kill_after: float) -> dict:
    from ray import serve

    pids = replica_pids()
    victim = pids[0]
    state: dict = {"killed_at": None, "back_at": None}

    proc = psutil.Process(victim)
    proc.cpu_percent()

    def tick(elapsed: float) -> None:
        if state["killed_at"] is None and elapsed >= kill_after:
            busy = proc.cpu_percent()  # since the last tick: > 50 % means a UNet pass is running on it
            if busy < 50 and elapsed < kill_after + 10:
                return  # wait for a moment when the victim has requests in flight
            state["victim_cpu_pct"] = busy
            os.kill(victim, signal.SIGKILL)
            state["killed_at"] = time.perf_counter()
        elif state["killed_at"] is not None and state["back_at"] is None and int(elapsed) % 2 == 0:
            replicas = serve.status().applications[APP].deployments["Generator"].replica_states
            alive = [p for p in replica_pids() if p != victim]
            if replicas.get("RUNNING", 0) >= 2 and len(alive) >= 2:
                state["back_at"] = time.perf_counter()

    run = asyncio.run(open_loop(url, 0.8 * capacity, seconds, sdk_share=0.5, on_tick=tick))
    res = run["results"]
    window = [r for r in res if state["killed_at"] and r["t"] + r["latency"] >= state["killed_at"] - 1]

    def failed(kind: str, rows: list[dict]) -> int:
        return sum(1 for r in rows if r["kind"] == kind and r["status"] != 200)

    raw_rows, sdk_rows = [r for r in res if r["kind"] == "raw"], [r for r in res if r["kind"] == "sdk"]
    return {
        "replicas": 2,
        "offered_req_per_s": 0.8 * capacity,
        "killed_pid": victim,
        "killed_after_s": kill_after,
        "victim_cpu_pct_before_kill": state.get("victim_cpu_pct"),
        "raw_requests": len(raw_rows),
        "raw_failed": failed("raw", raw_rows),
        "raw_failed_in_window": failed("raw", window),
        "raw_failed_pct": 100 * failed("raw", raw_rows) / max(len(raw_rows), 1),
        "raw_statuses": sorted({str(r["status"]) for r in raw_rows}),
        "sdk_requests": len(sdk_rows),
        "sdk_failed": failed("sdk", sdk_rows),
        "sdk_failed_pct": 100 * failed("sdk", sdk_rows) / max(len(sdk_rows), 1),
        "sdk_statuses": sorted({str(r["status"]) for r in sdk_rows}),
        "longest_request_s": max(r["latency"] for r in res),
        "client_timeout_s": TIMEOUT_S + 30,
        "replaced_after_s": (state["back_at"] - state["killed_at"]) if state["back_at"] else None,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["overload", "soak", "kill"], action="append", help="run just these")
    p.add_argument("--concurrency", type=int, default=16, help="clients of the capacity measurement")
    p.add_argument("--capacity-seconds", type=float, default=20)
    p.add_argument("--seconds", type=float, default=30, help="length of the overload run")
    p.add_argument("--soak-seconds", type=float, default=300)
    p.add_argument("--kill-seconds", type=float, default=60)
    p.add_argument("--kill-after", type=float, default=15)
    p.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "serve_reliability.json"))
    a = p.parse_args(argv)
    wanted = set(a.only or ["overload", "soak", "kill"])
    tmp = Path(tempfile.mkdtemp(prefix="serve-rel-"))
    adapters = make_adapters(tmp)
    cache = tmp / "cache"

    import ray
    from ray import serve

    from serving.app import build_app

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results: dict = {}
    # a private instance (never the "latest cluster" another `ray start` on the machine left in /tmp/ray)
    ray.init(address="local", _temp_dir=str(private_temp_dir()), num_cpus=4, _node_ip_address="127.0.0.1",
             include_dashboard=False, log_to_driver=False)  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(reliability_args(adapters, cache)), name=APP, route_prefix="/")
        cap = asyncio.run(closed_loop(url, a.concurrency, a.capacity_seconds))
        results["capacity"] = cap
        print(f"capacity: {cap['req_per_s']:.2f} req/s at {a.concurrency} clients ({cap['failed']} failed)", flush=True)
        if "overload" in wanted:
            o = results["overload"] = overload(url, cap["req_per_s"], a.seconds)
            print(
                f"overload at 2x ({o['offered_req_per_s']:.2f} req/s, {o['sent']} sent): {o['accepted']} accepted, "
                f"{o['shed_503']} shed with 503 ({o['shed_with_retry_after']} with Retry-After), {o['other']} other; "
                f"accepted p50 {o['p50_accepted_s']:.2f} s, p99 {o['p99_accepted_s']:.2f} s "
                f"(timeout {TIMEOUT_S:.0f} s); "
                f"replica RSS {o['replica_rss_mb_before']:.0f} -> {o['replica_rss_mb_after']:.0f} MB; ok={o['ok']}",
                flush=True,
            )
        if "soak" in wanted:
            s = results["soak"] = soak(url, a.concurrency, a.soak_seconds)
            print(
                f"soak {s['seconds']:.0f} s, {s['concurrency']} clients back to back ({s['req_per_s']:.2f} req/s): "
                f"{s['accepted']} ok, {s['failed']} failed; replica RSS {s['rss_mb_start']:.0f} MB at start, "
                f"{s['rss_mb_at_60s']:.0f} at 60 s, {s['rss_mb_end']:.0f} at the end: "
                f"{s['rss_growth_after_60s_mb']:+.1f} MB after the first minute "
                f"({s['rss_growth_mb_per_min']:+.2f} MB/min)",
                flush=True,
            )
        if "kill" in wanted:
            serve.delete(APP)
            serve.run(build_app(reliability_args(adapters, cache, replicas=2)), name=APP, route_prefix="/")
            k = results["kill"] = replica_kill(url, cap["req_per_s"], a.kill_seconds, a.kill_after)
            back = f"{k['replaced_after_s']:.1f} s" if k["replaced_after_s"] is not None else "not within the run"
            print(
                f"replica killed under {k['offered_req_per_s']:.2f} req/s: raw requests {k['raw_failed']}/"
                f"{k['raw_requests']} failed ({k['raw_failed_pct']:.1f}%, statuses {k['raw_statuses']}); SDK with "
                f"retries {k['sdk_failed']}/{k['sdk_requests']} failed ({k['sdk_failed_pct']:.1f}%); longest request "
                f"{k['longest_request_s']:.1f} s (client timeout {k['client_timeout_s']:.0f} s); victim at "
                f"{k['victim_cpu_pct_before_kill']:.0f}% CPU when killed; two replicas again "
                f"after {back}",
                flush=True,
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    results = main()
    failed = [k for k in ("overload",) if k in results and not results[k]["ok"]]
    sys.exit(1 if failed else 0)
