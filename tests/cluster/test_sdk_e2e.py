"""The Python SDK end to end on a real local cluster: `lorafleet up` → the Serve app (`lorafleet serve`) →
``Client.upload(folder)`` (packed and streamed as a tar) → ``Client.fine_tune`` → ``job.wait()`` (the pipeline as a
Ray job) → ``Client.generate`` with its ``fine_tuned_model`` from the running replicas. The same smallest budget
as tests/cluster/test_finetune_e2e.py (one trial at the known-good point); it prints the upload-to-first-image
time. Slow (one pipeline run, ~5 min on 2 idle cores, more on busy ones)."""

from __future__ import annotations

import json
import time

import pytest

from serving.client import Client
from tests.cluster.test_e2e import NO_LATENCY_BOUND, cli_ok, cluster, job_log, ray_tmpdir  # noqa: F401
from tests.cluster.test_finetune_e2e import JOB_S

pytestmark = [pytest.mark.slow, pytest.mark.reliability, pytest.mark.timeout(3600)]


def test_the_sdk_turns_a_folder_into_a_served_adapter(cluster, toy_world_data, tmp_path, capsys):  # noqa: F811
    port = cluster.ports.serve
    every_job = json.dumps(["evaluation.candidates=1", NO_LATENCY_BOUND])
    argv = ["serve", "--address", cluster.dashboard_url, "--tracking-uri", cluster.mlflow_uri, "--name", "ft",
            "--port", str(port), "warmup=false", f"files.root={tmp_path / 'files'}",
            f"finetune.ray_address={cluster.dashboard_url}", "finetune.poll_s=1",
            f"finetune.overrides={every_job}"]  # fmt: skip
    cli_ok(capsys, argv)
    with Client(f"http://127.0.0.1:{port}", timeout=300) as client:
        start = time.monotonic()
        file = client.upload(toy_world_data["dotted"])
        assert file.status == "processed" and file.dataset["archive"] == "tar" and file.dataset["captions"]
        job = client.fine_tune(file, suffix="sdk-style", seed=0, hyperparameters={"n_epochs": 16,
                               "learning_rate_multiplier": 3.0, "rank": 16, "optimizer": "adamw"})  # fmt: skip
        try:
            job.wait(timeout=JOB_S, poll=2)
        except Exception as exc:
            from cluster.jobs import Jobs

            raise AssertionError(f"{exc}\n{job_log(Jobs(cluster.dashboard_url, cluster.mlflow_uri), job.id)}") from exc
        waited = time.monotonic() - start
        [image] = client.generate("a blue square on a sks background", adapter=job.fine_tuned_model, seed=0)
        total = time.monotonic() - start
        [ckpt] = job.checkpoints()  # before the client closes
    shown = capsys.readouterr().err
    assert job.fine_tuned_model == "default--sdk-style" and image.size[0] > 0
    assert "stage tune: done" in shown and "served now" in shown  # wait() showed the events as they came
    assert ckpt["fine_tuned_model_checkpoint"].startswith("default--sdk-style/")
    print(f"\nSDK e2e: upload -> succeeded {waited:.0f} s; upload -> first image {total:.0f} s")
