"""The cluster-facing ``lorafleet`` commands: up, down, status, validate, submit, logs, stop, jobs, serve, generate.

Each takes ``argv`` and returns an exit code: 0 done, 1 the thing failed (a job, a check), 2 bad arguments
or config (argparse's own code), 3 the cluster is not there.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

EXIT_NO_CLUSTER = 3


def _parser(prog: str, doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"lorafleet {prog}", description=doc)


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, an http $RAY_ADDRESS, "
        "else the running `lorafleet up` cluster's; never another cluster on this machine)",
    )


def _state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="where up keeps PIDs and MLflow's data (default: runs/cluster)")


def urls(state) -> str:
    return "\n".join([
        f"  Ray dashboard   {state.dashboard_url}",
        f"  MLflow UI       {state.mlflow_uri}",
        f"  Serve endpoint  {state.serve_url}   (web page {state.serve_url}/, API docs {state.serve_url}/docs)",
    ])  # fmt: skip


def token_hint() -> str:
    """How to open the Ray dashboard: Ray 2.60's ``ray start`` turns token auth on, so its login page asks for one."""
    ray = "ray" if shutil.which("ray") else str(Path(sys.executable).with_name("ray"))
    return f"the Ray dashboard asks for a token: `{ray} get-auth-token` prints it (the token in ~/.ray/auth_token)"


def up(argv: list[str]) -> int:
    from cluster.local import ClusterError, Ports, grafana_dashboard_copy
    from cluster.local import up as start

    p = _parser("up", "Start a local Ray head and MLflow server on 127.0.0.1 (idempotent).")
    _state(p)
    d = Ports()
    for flag, default, what in (("--ray-port", d.ray, "Ray GCS"), ("--dashboard-port", d.dashboard, "dashboard"),
                                ("--mlflow-port", d.mlflow, "MLflow"), ("--client-port", d.client, "Ray client"),
                                ("--agent-port", d.agent, "dashboard agent"),
                                ("--serve-port", d.serve, "Serve HTTP (recorded for status)")):  # fmt: skip
        p.add_argument(flag, type=int, default=default, help=f"{what} port (default {default})")
    p.add_argument("--num-cpus", type=int, help="CPUs Ray may use (default: all)")
    p.add_argument("--num-gpus", type=int, help="GPUs for Ray; logical ones on CPU test GPU packing")
    a = p.parse_args(argv)
    ports = Ports(a.ray_port, a.dashboard_port, a.mlflow_port, a.client_port, a.agent_port, a.serve_port)
    try:
        state = start(a.state_dir, ports, a.num_cpus, a.num_gpus)
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"lorafleet is up (state in {state.state_dir}):\n{urls(state)}")
    print(f"  Ray GCS         {state.address}   (temp dir {state.temp_dir or 'Ray default'})\n  {token_hint()}")
    if state.temp_dir and (dashboard := grafana_dashboard_copy(state.temp_dir)).is_file():
        print(f"  Grafana: the lorafleet serving dashboard is {dashboard} (README, Grafana dashboard)")
    print(f"  for plain `ray job …` / MLflow clients: export RAY_AUTH_MODE=token "
          f"RAY_API_SERVER_ADDRESS={state.dashboard_url} MLFLOW_TRACKING_URI={state.mlflow_uri}")  # fmt: skip
    return 0


def down(argv: list[str]) -> int:
    from cluster.local import down as stop

    p = _parser("down", "Stop the Ray head and MLflow server that `lorafleet up` started (their data stays).")
    _state(p)
    a = p.parse_args(argv)
    state = stop(a.state_dir)
    print("nothing to stop" if state is None else f"stopped (data kept in {state.state_dir})")
    return 0


def status(argv: list[str]) -> int:
    from cluster.local import status as look

    p = _parser("status", "Show what runs where; exit 0 when Ray and MLflow both answer, else 1.")
    _state(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    a = p.parse_args(argv)
    info = look(a.state_dir)
    if a.json:
        print(json.dumps(info, indent=2))
    elif not info["components"]:
        print(f"not up (no state in {info['state_dir']}): run `lorafleet up`")
    else:
        for name, c in info["components"].items():
            where = c.get("dashboard") or c.get("url")
            pid = f"pid {c['pid']}" if c.get("pid") else ""
            print(f"  {name:7s} {'running' if c['running'] else 'stopped':8s} {where:28s} {pid}")
            if name == "ray":  # what `ray.init(address=…)` joins, and where this head keeps its sessions and logs
                print(f"          GCS {c['address']}   temp dir {c.get('temp_dir') or '(Ray default)'}")
    return 0 if info["up"] else 1


def _validate_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``validate``'s settings as ``data.*`` keys, and why any cannot be: a ``data.path`` (the positional folder
    is the path) or a key of another section (``train.lr``: validate reads only the dataset)."""
    from training.config import DataConfig

    keys, problems = [], []
    for item in overrides:
        key = item.partition("=")[0].strip()
        head = key.split(".")[0]
        if head != "data" and head not in DataConfig.model_fields and "." in key:
            problems.append(f"{item!r}: validate takes only data.* settings (the dataset's); {key} is for training")
            continue
        full = item if head == "data" else f"data.{item}"
        if full.partition("=")[0].strip() == "data.path":
            problems.append(f"{item!r}: the dataset folder is validate's first argument; drop data.path")
            continue
        keys.append(full)
    return keys, problems


def _settings_error(problems: list[str], as_json: bool) -> int:
    """Exit status 2 for invalid settings, the problems on stderr, or with ``--json`` as JSON on stdout (so a
    script reading stdout learns why)."""
    from training.configuration import ConfigError

    if as_json:
        rows = [{"file": ".", "severity": "error", "message": m} for m in problems]
        print(json.dumps({"error": "invalid settings", "problems": rows}, indent=2))
    else:
        print(f"error: {ConfigError(problems, 'lorafleet validate')}", file=sys.stderr)
    return 2


def validate(argv: list[str]) -> int:
    from pydantic import BaseModel

    from training.config import DataConfig
    from training.configuration import ConfigError, validate_values
    from training.data import validate_dataset
    from training.layout import Problem
    from training.preview import describe, write_preview
    from training.training_set import check_class_images, run_fingerprint

    class _Data(BaseModel):  # so a problem is named as in a config file: data.background
        data: DataConfig

    p = _parser(
        "validate",
        "Check a dataset folder (or s3:// gs:// file:// URI) file by file; writes nothing unless --preview. "
        "Any data.* setting of the training config may follow, e.g. `validate DIR data.background=black`; "
        "data.class_data_dir's class images are checked as training checks them.",
    )
    p.add_argument("path", help="images + metadata.jsonl, or images + .txt captions")
    p.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE", help="data settings as in a training config")
    p.add_argument("--trigger", help="the trigger word captions must contain")
    p.add_argument(
        "--resolution",
        type=int,
        help="training resolution: images whose short side is below their bucket's are errors (default: the "
        "--base-model's own, e.g. 64 for models/toy-sd, 512 for SD 1.x, 1024 for SDXL; else 512)",
    )
    p.add_argument(
        "--base-model",
        help="diffusers folder or cached hub id: also check caption lengths against its tokenizer (warning when "
        "cut, error when the trigger is cut off) and data.bucket_step against its granularity",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="machine-readable report: every usable image with its caption as trained, size, mode, repeats, "
        "bucket and the conversions applied",
    )
    p.add_argument(
        "--preview",
        metavar="OUT",
        help="write each usable image as the model sees it (converted, resized, cropped to its bucket) to "
        "OUT/0001.png with its caption in OUT/0001.txt, and OUT/index.html to browse them (outside the dataset)",
    )
    a = p.parse_intermixed_args(argv)  # settings may come after the options too
    overrides, problems = _validate_overrides(a.overrides)
    resolution = a.resolution
    if resolution is None and a.base_model:  # the model's own size, as its pipeline draws by default
        from training.buckets import native_resolution

        try:
            resolution = native_resolution(a.base_model)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"--base-model {a.base_model}: cannot read its unet/vae config ({exc})")
    values = {"data": {"path": a.path, "trigger": a.trigger, "resolution": resolution or 512}}
    cfg = None
    try:
        cfg = validate_values(_Data, values, overrides, "lorafleet validate").data
    except ConfigError as exc:
        problems += [p for p in exc.problems if p not in problems]
    if cfg is not None and a.base_model and cfg.buckets:  # the model's own step, as training resolves it
        from training.buckets import check_step, model_granularity

        try:
            model_step = model_granularity(a.base_model)
            problems += check_step(cfg.bucket_step or model_step, model_step, cfg.resolution)
            cfg = cfg.model_copy(update={"bucket_step": cfg.bucket_step or model_step})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"--base-model {a.base_model}: cannot read its unet/vae config ({exc})")
    if problems:
        return _settings_error(problems, a.json)
    report = validate_dataset(cfg)
    fingerprint = report.fingerprint()
    if cfg.class_data_dir:  # as training reads them (training_set.check_class_images)
        classes = check_class_images(cfg)
        fingerprint = run_fingerprint(report, classes)
        report.examples += classes.examples
        report.problems += [Problem("data.class_data_dir" + ("" if x.file == "." else f"/{x.file}"), x.severity,
                                    x.message) for x in classes.problems]  # fmt: skip
    if a.base_model:
        from training.captions import caption_length_problems, load_tokenizer

        try:
            tokenizer = load_tokenizer(a.base_model)
        except OSError as exc:
            report.problems.append(Problem(".", "error", f"--base-model: {exc}"))
        else:
            names = [(r["file"], ex.caption) for r, ex in zip(describe(report, cfg), report.examples)]
            report.problems += caption_length_problems(names, tokenizer, cfg.trigger)
    if a.json:
        print(json.dumps({"root": str(report.root), "format": report.format, "images": len(report.instances),
                          "class_images": len(report.examples) - len(report.instances),
                          "fingerprint": fingerprint, "buckets": report.buckets,
                          "bucket_rule": report.bucket_rule, "examples": describe(report, cfg),
                          "problems": [vars(x) for x in report.problems]}, indent=2))  # fmt: skip
    else:
        print(report.summary())
        print("ok" if not report.errors else f"{len(report.errors)} error(s): fix them and run validate again")
    if a.preview:
        try:
            written = write_preview(report, cfg, a.preview)
        except (FileExistsError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        where = Path(a.preview) / "index.html"
        print(
            f"preview: {len(written)} images as the model sees them in {where}",
            file=sys.stderr if a.json else sys.stdout,
        )
    return 1 if report.errors else 0


def _jobs(a: argparse.Namespace):
    from cluster.jobs import Jobs

    return Jobs(a.address, getattr(a, "tracking_uri", None))


def _follow(jobs, job_id: str) -> int:
    for chunk in jobs.logs(job_id, follow=True):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    status = jobs.wait(job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def submit(argv: list[str]) -> int:
    from cluster.jobs import KINDS

    p = _parser("submit", "Submit a pipeline, tune, train or serve job to the Ray cluster (ray job submit).")
    p.add_argument("kind", choices=sorted(KINDS), help="which entry point the job runs")
    p.add_argument("--config", help="its YAML (default configs/<kind>.yaml)")
    p.add_argument("--resume", action="store_true", help="pipeline/tune/train: continue an interrupted run")
    p.add_argument("--follow", action="store_true", help="stream the log until the job ends; exit 1 unless it succeeds")
    p.add_argument("--tracking-uri", help="MLflow server for the job (default $MLFLOW_TRACKING_URI, else up's)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0, help="CPUs reserved for the driver (default 0)")
    p.add_argument("--entrypoint-num-gpus", type=float, default=0, help="GPUs reserved for the driver (default 0)")
    _address(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. name=try2 serve.port=8001")
    a = p.parse_intermixed_args(argv)  # flags anywhere: `submit pipeline name=x --follow` too
    from cluster.jobs import validate_config

    validate_config(a.kind, a.config or KINDS[a.kind].default_config, a.overrides)  # before any connection
    jobs = _jobs(a)
    job_id = jobs.submit(a.kind, a.config, a.overrides, resume=a.resume, entrypoint_num_cpus=a.entrypoint_num_cpus,
                         entrypoint_num_gpus=a.entrypoint_num_gpus)  # fmt: skip
    print(f"submitted {job_id} to {jobs.address}  (lorafleet logs {job_id} --follow; lorafleet stop {job_id})")
    return _follow(jobs, job_id) if a.follow else 0


def logs(argv: list[str]) -> int:
    p = _parser("logs", "Print a job's log (--follow: until it ends).")
    p.add_argument("job_id")
    p.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
    _address(p)
    a = p.parse_args(argv)
    jobs = _jobs(a)
    if a.follow:
        return _follow(jobs, a.job_id)
    for chunk in jobs.logs(a.job_id):
        sys.stdout.write(chunk)
    return 0


def stop(argv: list[str]) -> int:
    p = _parser("stop", "Stop a job: SIGTERM (a pipeline saves its trials; --resume continues), then SIGKILL.")
    p.add_argument("job_id")
    p.add_argument("--wait", action="store_true", help="wait until it has stopped")
    _address(p)
    a = p.parse_args(argv)
    jobs = _jobs(a)
    if not jobs.stop(a.job_id):
        print(f"job {a.job_id} is not running ({jobs.status(a.job_id)})")
        return 0
    print(f"stopping {a.job_id}" + (f": {jobs.wait(a.job_id)}" if a.wait else ""))
    return 0


def jobs(argv: list[str]) -> int:
    p = _parser("jobs", "List the cluster's jobs (newest last), or show one job's result from MLflow.")
    p.add_argument("job_id", nargs="?", help="show this job's status and result (pipeline.json from MLflow)")
    p.add_argument("--tracking-uri", help="MLflow server (default $MLFLOW_TRACKING_URI, else up's)")
    _address(p)
    a = p.parse_args(argv)
    client = _jobs(a)
    if a.job_id:
        print(f"{a.job_id}: {client.status(a.job_id)}")
        print(json.dumps(client.result(a.job_id), indent=2, default=str))
        return 0
    for info in sorted(client.list(), key=lambda j: j.start_time or 0):
        print(f"  {info.submission_id or info.job_id:32s} {info.status.value:10s} {info.entrypoint[:90]}")
    return 0


def serve(argv: list[str]) -> int:
    p = _parser("serve", "Deploy or refresh the Serve application on the cluster (a job running serving.deploy).")
    p.add_argument("--config", default="configs/serve.yaml", help="Serve config file")
    p.add_argument("--port", type=int, help="HTTP port (default: the config's http_options.port)")
    p.add_argument("--name", default="lorafleet", help="Serve application name")
    p.add_argument("--route-prefix", default="/", help="where the application is mounted (default /)")
    p.add_argument("--tracking-uri", help="the registry's MLflow server (default $MLFLOW_TRACKING_URI, else up's)")
    _address(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides of the application args, e.g. max_adapters=2")
    a = p.parse_intermixed_args(argv)  # flags before or after the overrides
    client = _jobs(a)
    extra = [f"tracking_uri={client.tracking_uri}"] if client.tracking_uri else []
    flags = ["--name", a.name, "--route-prefix", a.route_prefix, *(["--port", str(a.port)] if a.port else [])]
    job_id = client.submit("serve", a.config, [*extra, *a.overrides], flags=flags)
    return _follow(client, job_id)


def image_size(value: str) -> str:
    """``--size``: "64" means a 64x64 square (the server takes only WIDTHxHEIGHT); "64x48" passes through."""
    if re.fullmatch(r"[0-9]{1,5}", value):
        return f"{value}x{value}"
    if re.fullmatch(r"[0-9]{1,5}x[0-9]{1,5}", value):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not a size: give WIDTHxHEIGHT (64x64) or one number (64)")


def generate(argv: list[str]) -> int:
    import os

    import httpx

    from serving.client import Client, LorafleetError

    p = _parser("generate", "Generate images from a running lorafleet server and save them as PNGs.")
    p.add_argument("prompt")
    p.add_argument("--url", default=None, help="server URL (default: up's Serve endpoint, http://127.0.0.1:8000)")
    p.add_argument("--model", default=None, help="champion, base, a configured name, NAME/VERSION or NAME@ALIAS")
    p.add_argument("--n", type=int, default=1, help="images (server limit: limits.max_n)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (image i uses seed+i)")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--size", type=image_size, help="WIDTHxHEIGHT, or one number for a square: 64 = 64x64")
    p.add_argument("--out", default="runs/generate", help="folder for the PNGs")
    p.add_argument("--api-key-env", default="LORAFLEET_API_KEY", help="environment variable holding the API key")
    a = p.parse_args(argv)
    if a.url is None:
        from training.cluster_state import ClusterState

        state = ClusterState.load()
        a.url = state.serve_url if state else "http://127.0.0.1:8000"
    try:
        with Client(a.url, api_key=os.environ.get(a.api_key_env)) as client:
            images = client.generate(a.prompt, adapter=a.model, n=a.n, seed=a.seed, steps=a.steps,
                                     guidance=a.guidance, size=a.size)  # fmt: skip
    except LorafleetError as exc:
        if isinstance(exc.__cause__, httpx.TransportError):  # nothing listens there (after the retries)
            print(f"error: no server at {a.url} ({exc.__cause__}); `lorafleet serve` or `make demo` starts one",
                  file=sys.stderr)  # fmt: skip
            return EXIT_NO_CLUSTER
        print(f"error: {exc}", file=sys.stderr)
        return 2 if exc.status in (400, 404, 422) else 1
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out / f"{image.info.get('model', 'image')}-{image.info.get('seed', i)}.png".replace("/", "_")
        image.save(path)
        print(f"{path}  model={image.info.get('model')} version={image.info.get('version')} "
              f"seed={image.info.get('seed')}")  # fmt: skip
    return 0


COMMANDS = {
    "up": (up, "start a local Ray head + MLflow server on 127.0.0.1 (dashboard :8265, MLflow :5000)"),
    "down": (down, "stop what `up` started"),
    "status": (status, "show what runs where"),
    "validate": (validate, "check a dataset folder or URI file by file: `validate DIR`"),
    "submit": (submit, "submit a pipeline / tune / train / serve job: `submit pipeline --follow`"),
    "logs": (logs, "print or follow a job's log: `logs JOB_ID --follow`"),
    "stop": (stop, "stop a job (SIGTERM; a pipeline can then --resume)"),
    "jobs": (jobs, "list jobs, or show one job's result from MLflow: `jobs JOB_ID`"),
    "serve": (serve, "deploy or refresh the Serve application on the cluster"),
    "generate": (generate, "images from the served model: `generate PROMPT --model champion`"),
}
