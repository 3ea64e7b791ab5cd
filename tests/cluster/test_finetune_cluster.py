"""Fine-tuning over HTTP on a real local cluster, the ways it goes wrong: a bad upload, another tenant's ids on every
route, cancel while queued and while running, and (`make reliability`) a gate failure and a restart of the Serve app
while a job runs. One cluster (`lorafleet up`) and one app (`lorafleet serve` with real tenant keys, at most 2 jobs at
once, 1 per tenant) serve the whole module; each test leaves the queue idle. Every wait is a condition with a
generous limit: the machine has 2 shared cores.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider \\
        tests/cluster/test_finetune_cluster.py          # add -m 'slow or reliability': the gate failure, the restart
"""

from __future__ import annotations

import base64
import json
import shutil

import httpx
import pytest

from serving.finetune.jobs import TERMINAL
from tests.cluster.finetune_service import (
    APP,
    JOB_S,
    KNOWN_GOOD,
    TOO_LITTLE,
    create_job,
    deploy,
    details,
    events,
    job,
    ray_jobs,
    ray_tmpdir,  # noqa: F401  (with the admin key in the cluster's environment)
    start_service,
    upload,
    wait_for_status,
    wait_quiet,
)
from tests.cluster.test_e2e import READY_S, cluster, job_log  # noqa: F401
from tests.procs import tail, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def service(cluster, tmp_path_factory):  # noqa: F811
    s = start_service(cluster, tmp_path_factory.mktemp("ft"), ["acme", "bravo"])
    yield s
    s.close()


@pytest.fixture(scope="module")
def data(toy_world_data):
    return toy_world_data["dotted"]  # 20 captioned images + heldout/


def test_a_bad_upload_gets_its_per_file_report_and_is_kept_for_it(service, data, tmp_path):
    bad = tmp_path / "toy-bad"
    shutil.copytree(data, bad)
    broken = sorted(bad.glob("*.png"))[3]
    broken.write_bytes(b"not an image at all")
    acme = service.http("acme")
    error = upload(acme, bad, expect=400)["error"]
    assert error["code"] == "invalid_dataset" and error["file"]["status"] == "error", error
    assert any(p["severity"] == "error" and p["file"].endswith(broken.name) for p in error["problems"]), error
    assert not any(p["file"].endswith("0000.png") for p in error["problems"])  # the report names files one by one
    file_id = error["file"]["id"]
    assert acme.get(f"/v1/files/{file_id}").json()["status"] == "error"  # kept, so its report can be read again
    r = acme.post("/v1/fine_tuning/jobs", json={"model": "base", "training_file": file_id})
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file", r.text
    assert acme.delete(f"/v1/files/{file_id}").json()["deleted"] is True
    assert acme.get(f"/v1/files/{file_id}").status_code == 404


def test_another_tenants_files_and_jobs_are_404_on_every_route(service, data):
    acme, bravo = service.http("acme"), service.http("bravo")
    file_id = upload(acme, data)["id"]
    job_id = create_job(acme, file_id, KNOWN_GOOD, suffix="private")["id"]
    other_file, other_job = "file-" + "0" * 24, "ftjob-" + "0" * 24  # ids that exist nowhere
    try:
        routes = [("GET", "/v1/files/{f}"), ("DELETE", "/v1/files/{f}"), ("GET", "/v1/fine_tuning/jobs/{j}"),
                  ("GET", "/v1/fine_tuning/jobs/{j}/events"), ("GET", "/v1/fine_tuning/jobs/{j}/checkpoints"),
                  ("POST", "/v1/fine_tuning/jobs/{j}/cancel")]  # fmt: skip
        for method, route in routes:
            theirs = bravo.request(method, route.format(f=file_id, j=job_id))
            missing = bravo.request(method, route.format(f=other_file, j=other_job))
            assert theirs.status_code == 404 == missing.status_code, (method, route, theirs.text)
            worded = theirs.json()["error"]["message"].replace(file_id, other_file).replace(job_id, other_job)
            assert worded == missing.json()["error"]["message"]  # an id of acme's reads as one that does not exist
        r = bravo.post("/v1/fine_tuning/jobs", json={"model": "base", "training_file": file_id})
        assert r.status_code == 404 and r.json()["error"]["param"] == "training_file", r.text
        assert file_id not in {f["id"] for f in bravo.get("/v1/files").json()["data"]}
        assert job_id not in {j["id"] for j in bravo.get("/v1/fine_tuning/jobs").json()["data"]}
        assert bravo.get("/v1/fine_tuning/jobs", params={"after": job_id}).status_code == 404
        # bravo's DELETE and cancel changed nothing of acme's
        assert acme.get(f"/v1/files/{file_id}").json()["status"] == "processed"
        assert job(service, "acme", job_id)["status"] in ("queued", "running")
        assert httpx.get(f"{service.url}/v1/fine_tuning/jobs/{job_id}", timeout=60).status_code == 401  # no key
    finally:
        assert acme.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        wait_quiet(service, READY_S)


def test_cancel_while_queued_never_starts_it_and_while_running_stops_its_trials(service, data):
    from mlflow import MlflowClient
    from ray.util.state import list_actors

    acme = service.http("acme")
    file_id = upload(acme, data)["id"]
    first = create_job(acme, file_id, KNOWN_GOOD, suffix="cancel-running")["id"]
    second = create_job(acme, file_id, KNOWN_GOOD, suffix="cancel-queued")["id"]  # per_tenant 1: waits
    wait_for_status(service, "acme", first, ("running",), READY_S)
    assert job(service, "acme", second)["status"] == "queued"
    assert acme.post(f"/v1/fine_tuning/jobs/{second}/cancel").json()["status"] == "cancelled"

    trials = service.job_folder(first) / "runs" / first / "search" / "trials"
    wait_until(lambda: bool(list(trials.glob("*/ray/*/epoch_*"))), f"a trial's epoch checkpoint under {trials}",
               JOB_S, poll_s=2, details=lambda: details(service, "acme", first))  # fmt: skip
    cancelled = acme.post(f"/v1/fine_tuning/jobs/{first}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["fine_tuned_model"] is None
    assert service.jobs.wait(first, timeout_s=READY_S) == "STOPPED", job_log(service.jobs, first)
    log = next(service.jobs.logs(first))
    assert "SIGTERM: stopping the trials and saving the search" in log, tail(log, 20000)
    summary = json.loads((service.job_folder(first) / "runs" / first / "pipeline.json").read_text())
    assert summary["stages"]["tune"]["status"] == "stopped" and "register" not in summary["stages"], summary

    def no_trial_workers() -> bool:
        alive = list_actors(address=service.jobs.address, filters=[("state", "=", "ALIVE")], limit=10000,
                            raise_on_missing_output=False)  # fmt: skip
        return not any(a.class_name == "RayTrainWorker" for a in alive)

    wait_until(no_trial_workers, "the trials' Ray Train workers to exit", READY_S, poll_s=2)
    ml = MlflowClient(service.jobs.tracking_uri)
    assert ml.search_registered_models("name LIKE 'acme--cancel%'") == []  # nothing registered

    def seen_stopped() -> bool:  # the queue's next ticks saw the Ray job end: capacity is free again
        return json.loads((service.job_folder(first) / "job.json").read_text())["ray_status"] == "STOPPED"

    wait_until(seen_stopped, "the queue to see the stopped Ray job", READY_S, poll_s=1)
    wait_quiet(service, READY_S)
    assert second not in ray_jobs(service)  # the cancelled queued job was never submitted
    record = json.loads((service.job_folder(second) / "job.json").read_text())
    assert record["submission_id"] is None and record["status"] == "cancelled"
    assert [e["message"] for e in events(service, "acme", first)].count(f"started as Ray job {first}") == 1


@pytest.mark.reliability  # one pipeline job to the gate (~3 min on 2 idle cores)
def test_an_adapter_the_gate_refuses_ends_failed_with_the_gates_reasons(service, data):
    bravo = service.http("bravo")
    file_id = upload(bravo, data)["id"]
    job_id = create_job(bravo, file_id, TOO_LITTLE, suffix="undertrained")["id"]
    done = wait_for_status(service, "bravo", job_id, TERMINAL, JOB_S)
    assert done["status"] == "failed", details(service, "bravo", job_id)
    assert done["error"]["code"] == "gate_failed" and done["fine_tuned_model"] is None, done["error"]
    message = done["error"]["message"]
    assert message.startswith("gate: no adapter passed the gate") and "concept_gain" in message, message
    assert service.jobs.status(job_id) == "FAILED"  # the pipeline exits 1 when the gate says no
    ended = [e for e in events(service, "bravo", job_id) if e["message"].startswith("stage gate: failed")]
    assert ended and ended[0]["level"] == "error"
    served = {m["id"] for m in bravo.get("/v1/models").json()["data"]}
    assert "bravo--undertrained" not in served, served  # a refused adapter is not served


@pytest.mark.reliability  # one pipeline job while the app is deleted and deployed again (~5 min on 2 idle cores)
def test_a_job_and_its_file_survive_a_restart_of_the_serve_app(service, data):
    acme, bravo = service.http("acme"), service.http("bravo")
    file_id = upload(acme, data)["id"]
    job_id = create_job(acme, file_id, KNOWN_GOOD, suffix="survivor")["id"]
    wait_for_status(service, "acme", job_id, ("running",), READY_S)

    # delete the app: its ingress replica and the queue's poller go away while the job's Ray job runs on
    code = f"import ray; from ray import serve; ray.init(); serve.delete({APP!r})"
    stopper = service.jobs.client.submit_job(entrypoint=f'python -c "{code}"')
    assert service.jobs.wait(stopper, timeout_s=READY_S) == "SUCCEEDED", job_log(service.jobs, stopper)

    def down() -> bool:
        try:
            return httpx.get(f"{service.url}/healthz", timeout=10).status_code != 200
        except httpx.HTTPError:
            return True

    wait_until(down, "the Serve app to stop answering", READY_S, poll_s=1)
    assert service.jobs.status(job_id) in ("PENDING", "RUNNING")  # the job did not notice
    deploy(service.argv)  # the same app again: a new ingress replica reads the records from files.root

    assert acme.get(f"/v1/files/{file_id}").json()["status"] == "processed"
    done = wait_for_status(service, "acme", job_id, TERMINAL, JOB_S)
    assert done["status"] == "succeeded", f"{done['error']}\n{details(service, 'acme', job_id)}"
    assert done["fine_tuned_model"] == "acme--survivor"
    started = [e for e in events(service, "acme", job_id) if e["message"] == f"started as Ray job {job_id}"]
    assert len(started) == 1 and ray_jobs(service)[job_id].status.value == "SUCCEEDED"  # submitted once

    prompt = {"model": "acme--survivor", "prompt": "a blue square on a sks background", "response_format": "b64_json"}
    image = acme.post("/v1/images/generations", json=prompt)
    assert image.status_code == 200, image.text[:2000]
    assert base64.b64decode(image.json()["data"][0]["b64_json"])[:8] == b"\x89PNG\r\n\x1a\n"
    theirs = bravo.post("/v1/images/generations", json=prompt)
    assert theirs.status_code == 404, theirs.text[:2000]  # another tenant's adapter reads as a missing one
    assert "acme--survivor" not in {m["id"] for m in bravo.get("/v1/models").json()["data"]}
