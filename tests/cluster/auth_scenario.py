"""Run by tests/cluster/test_local_auth.py in a process of its own (HOME and TMPDIR fresh, so no Ray token and no
cached token state): ``lorafleet up``, a Ray job whose driver joins the head the way lorafleet's drivers do
(``training.ray_train.init_ray``) and runs an actor in a placement group (as a Tune trial does), then someone's
``ray.init()`` elsewhere on the machine (it writes ``~/.ray/auth_token`` when missing), then the same job again;
``lorafleet down``. Prints one JSON line: the token before/after, the head's RAY_AUTH_MODE and each job's status
and log tail.

    python -m tests.cluster.auth_scenario STATE_DIR
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from cluster.local import Ports, down, up

DRIVER = """
from training.ray_train import init_ray
init_ray()
import ray
from ray.util.placement_group import placement_group
pg = placement_group([{"CPU": 1}])
ray.get(pg.ready(), timeout=300)
@ray.remote(num_cpus=1)
class Trial:
    def ping(self):
        return "the actor ran"
print(ray.get(Trial.options(placement_group=pg).remote().ping.remote(), timeout=300))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(dashboard_url: str) -> dict:
    """Submit DRIVER as a Ray job from a fresh client process (token auth as lorafleet's CLI sets it up)."""
    client = f"""
import json, shlex, sys
from cluster.jobs import Jobs
jobs = Jobs({dashboard_url!r})
jid = jobs.client.submit_job(entrypoint=shlex.join([sys.executable, "-c", {DRIVER!r}]),
                             runtime_env={{"env_vars": {{"PYTHONPATH": {str(Path.cwd())!r}}}}})
status = jobs.wait(jid, timeout_s=900)
print(json.dumps({{"status": status, "log": jobs.client.get_job_logs(jid)[-3000:]}}))
"""
    done = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=1200)
    if done.returncode:
        return {"status": f"client exited {done.returncode}", "log": (done.stdout + done.stderr)[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(state_dir: str) -> None:
    token = Path.home() / ".ray" / "auth_token"
    out: dict = {"token_before_up": token.exists()}
    state = up(state_dir, Ports(*(free_port() for _ in range(6))), num_cpus=2)
    try:
        out["token_after_up"] = token.exists()
        out["token_mode"] = oct(token.stat().st_mode & 0o777) if token.exists() else None
        environ = Path(f"/proc/{state.ray_pid}/environ").read_bytes().split(b"\0")
        out["head_auth_mode"] = next((v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"RAY_AUTH_MODE=")),
                                     None)  # fmt: skip
        out["first"] = job(state.dashboard_url)
        elsewhere = "import ray; ray.init(num_cpus=1, include_dashboard=False); ray.shutdown()"
        subprocess.run([sys.executable, "-c", elsewhere], capture_output=True, timeout=600)
        out["token_after_elsewhere"] = token.exists()
        out["second"] = job(state.dashboard_url)
    finally:
        down(state_dir)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
