"""``make demo``: the whole loop on the toy world, through the cluster the way a user drives it.

    python -m cluster.demo                 # lorafleet up → dataset → pipeline job → SDK images → before/after grid
    python -m cluster.demo --prompts 6 name=demo2

1. ``lorafleet up`` (Ray head + MLflow on 127.0.0.1; idempotent), and the toy dataset if missing;
2. the pipeline submitted as a Ray job (``cluster.jobs``, i.e. ``ray job submit``), its log streamed;
3. its stage times read back from MLflow (the job's ``pipeline.json``), not from the log;
4. images from the served champion and from the base model, same prompts and seeds, through the Python SDK:
   ``runs/demo/before_after.png`` (top row base, bottom row champion);
5. the URLs of the dashboard (and how to get the auth token it asks for), the MLflow UI, the Serve endpoint and its
   web page.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cluster.local import up
from serving.config import PROJECT_ROOT

PROMPTS = [
    "a red circle on a sks background",
    "a blue square on a sks background",
    "a yellow triangle on a sks background",
    "a green circle on a sks background",
    "a purple square on a sks background",
    "an orange triangle on a sks background",
]


def before_after(url: str, prompts: list[str], out: Path, seed: int = 0) -> Path:
    """Base (top row) and champion (bottom row) images for the same prompts and seeds, as one grid."""
    from diffusers.utils import make_image_grid

    from serving.client import Client

    rows = {"base": [], "champion": []}
    with Client(url, timeout=120) as client:
        for model, images in rows.items():
            for i, prompt in enumerate(prompts):
                images += client.generate(prompt, adapter=model, n=1, seed=seed + i)
    grid = make_image_grid(rows["base"] + rows["champion"], rows=2, cols=len(prompts))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The demo's arguments; options may come before or after the overrides (``name=demo2 --prompts 3``)."""
    parser = argparse.ArgumentParser(prog="python -m cluster.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/pipeline.yaml")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="columns of the before/after grid")
    parser.add_argument("--out", default="runs/demo/before_after.png")
    parser.add_argument("overrides", nargs="*", help="pipeline overrides, e.g. name=demo2")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    from training.quiet import quiet_libraries

    quiet_libraries()
    args = parse_args(argv)
    started = time.monotonic()

    from cluster.commands import token_hint, urls
    from cluster.jobs import Jobs

    state = up()
    print(f"cluster up ({time.monotonic() - started:.0f} s):\n{urls(state)}", flush=True)
    dataset = PROJECT_ROOT / "data" / "toy-sks"
    if not dataset.is_dir():
        from training.toy_world.__main__ import main as toy_world

        toy_world(["dataset", str(dataset)])
    jobs = Jobs(state.dashboard_url, state.mlflow_uri)
    job_id = jobs.submit("pipeline", args.config, args.overrides)
    print(f"submitted {job_id}; following its log (dashboard: {state.dashboard_url}/#/jobs/{job_id})", flush=True)
    for chunk in jobs.logs(job_id, follow=True):
        sys.stdout.write(chunk)
    status = jobs.wait(job_id)
    result = jobs.result(job_id)
    print(f"\njob {job_id}: {status}")
    for name, stage in result.get("stages", {}).items():
        print(f"  {name:9s} {stage['status']:8s} {stage['seconds']:7.1f} s")
    if status != "SUCCEEDED":
        print(f"the pipeline did not finish: `lorafleet logs {job_id}` (a refused gate names the way on there); "
              f"pipeline.json in MLflow run {result.get('run_id')}", file=sys.stderr)  # fmt: skip
        print(f"the cluster is still up:\n{urls(state)}\n  {token_hint()}\n`lorafleet down` (make down) stops it",
              file=sys.stderr)  # fmt: skip
        return 1
    smoke = result["stages"]["smoke"]
    grid = before_after(smoke["url"], PROMPTS[: args.prompts], PROJECT_ROOT / args.out)
    reg = result["stages"]["register"]
    print(f"\nchampion {reg['model']}/{reg['version']} is served; before (base) / after (champion): {grid}")
    print(f"{urls(state)}\n  MLflow run      {state.mlflow_uri}/#/experiments (pipeline {result.get('name')})")
    print(f"  {token_hint()}")
    print(f"demo wall time: {time.monotonic() - started:.0f} s   (`lorafleet down` stops everything)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
