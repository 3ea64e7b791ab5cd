"""A fine-tuning job on an upload without captions, end to end on a real local cluster with the official openai
client: the images come bare (the held-out folder keeps its captions), the job's pipeline captions them with the toy
captioner (its `caption` stage, inside the Ray job), the events show each caption and — while the job is still
running — each epoch of the trial, the `concept` extra reaches the evaluation, and the adapter is served. Slow (one
pipeline run, ~5 min on 2 idle cores); every wait is a condition with a generous limit."""

from __future__ import annotations

import json
import shutil

import pytest

from cluster.jobs import Jobs
from tests.cluster.test_e2e import NO_LATENCY_BOUND, cli_ok, cluster, job_log, ray_tmpdir  # noqa: F401
from tests.cluster.test_finetune_e2e import JOB_S, tar_gz
from tests.procs import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.reliability, pytest.mark.timeout(3600)]


def test_an_upload_without_captions_is_captioned_and_its_epochs_show_while_it_runs(cluster, toy_world_data,  # noqa: F811
                                                                                  tmp_path, capsys):  # fmt: skip
    openai = pytest.importorskip("openai")
    bare = tmp_path / "toy-sks"
    shutil.copytree(toy_world_data["dotted"], bare)
    truth = {json.loads(line)["file_name"]: json.loads(line)["text"] for line in
             (bare / "metadata.jsonl").read_text().splitlines()}  # fmt: skip
    (bare / "metadata.jsonl").unlink()  # the training images without captions; heldout/ keeps its own
    port = cluster.ports.serve
    every_job = json.dumps(["evaluation.candidates=1", NO_LATENCY_BOUND])
    argv = ["serve", "--address", cluster.dashboard_url, "--tracking-uri", cluster.mlflow_uri, "--name", "ftcap",
            "--port", str(port), "warmup=false", f"files.root={tmp_path / 'files'}",
            f"finetune.ray_address={cluster.dashboard_url}", "finetune.poll_s=1",
            f"finetune.overrides={every_job}"]  # fmt: skip
    cli_ok(capsys, argv)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300, max_retries=2)
    file = client.files.create(file=("bare.tar.gz", tar_gz(bare)), purpose="fine-tune")
    assert file.status == "processed" and file.model_extra["dataset"]["captions"] is False
    job = client.fine_tuning.jobs.create(
        model="base", training_file=file.id, suffix="bare", seed=0,
        hyperparameters={"n_epochs": 16, "learning_rate_multiplier": 3.0, "rank": 16, "optimizer": "adamw"},
        extra_body={"trigger": "sks", "concept": "dotted"},
    )  # fmt: skip
    jobs = Jobs(cluster.dashboard_url, cluster.mlflow_uri)

    def messages() -> list[str]:
        return [e.message for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data)]

    def details() -> str:
        return "\n".join(messages()) + "\n" + job_log(jobs, job.id)

    seen_running: list[str] = []

    def an_epoch_while_running() -> bool:
        status = client.fine_tuning.jobs.retrieve(job.id).status
        epochs = [m for m in messages() if ": epoch " in m]
        if epochs and status == "running":
            seen_running.extend(epochs)
        return bool(seen_running) or status in ("succeeded", "failed", "cancelled")

    wait_until(an_epoch_while_running, f"job {job.id}: an epoch event while it runs", JOB_S, poll_s=2,
               details=details)  # fmt: skip
    assert seen_running, f"no epoch event while the job ran\n{details()}"
    assert "/16, train loss " in seen_running[0]

    def ended() -> bool:
        return client.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed", "cancelled")

    wait_until(ended, f"fine-tuning job {job.id} to end", JOB_S, poll_s=5, details=details)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", f"{done.error}\n{details()}"
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    shown = {e.data["file"]: e.data["caption"] for e in events if e.message.startswith("caption ")}
    assert shown == truth, details()  # every bare image got the toy world's caption, trigger in place
    all_messages = [e.message for e in events]
    assert any(m.startswith("stage caption: done") for m in all_messages)
    assert len({e.id for e in events}) == len(events)
    epoch_events = [e for e in events if e.data and "epoch" in e.data and "trial_id" in e.data]
    assert sorted(e.data["epoch"] for e in epoch_events) == list(range(1, 17))  # each epoch once
    # the concept word reached the evaluation: the concept-word metrics were measured
    summary = json.loads((tmp_path / "files" / "jobs" / job.id / "runs" / job.id / "pipeline.json").read_text())
    measured = summary["stages"]["evaluate"]["metrics"]
    assert {"clip_t", "concept_learned"} <= set(measured), sorted(measured)
