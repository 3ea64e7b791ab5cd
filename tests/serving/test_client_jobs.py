"""The SDK's uploads and fine-tuning jobs (serving/client_files.py, serving/client_jobs.py) against the real ingress
routes over HTTP: the Serve app's FastAPI served by uvicorn on 127.0.0.1 in a thread (the replica context
monkeypatched, as tests/serving/test_finetune.py does), its queue's poller running against a scripted fake cluster.
"""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from serving.client import (
    AsyncClient,
    BadRequest,
    Client,
    JobCancelled,
    JobFailed,
    JobTimeout,
    NotFound,
)
from serving.client_files import tar_entries, tar_size, tar_stream, upload_body
from serving.finetune.jobs import JobStore
from tests.serving.test_files import zip_bytes
from tests.serving.test_finetune import PASSED, FakeCluster, write_summary

KEY_ENV, KEY = "LORAFLEET_TEST_SDK_KEY", "sdk-test-key"
GATE_REASONS = "no adapter passed the gate — candidate 1 (trial 0): concept_gain 0.02 < 0.11"


class ScriptedCluster(FakeCluster):
    """Each Ray job moves one step per poll: PENDING, RUNNING, RUNNING, then its end, chosen by the job's suffix:
    ``…--gate`` fails the gate, ``…--hang`` runs until stopped, any other succeeds (the pipeline's summary is
    written as cluster.pipeline would)."""

    def __init__(self, store: JobStore):
        super().__init__(capacity=4)
        self.store, self.polls = store, {}

    def status(self, submission_id: str) -> str:
        if self.jobs[submission_id] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return self.jobs[submission_id]
        self.polls[submission_id] = n = self.polls.get(submission_id, 0) + 1
        name = self.store.load(submission_id).fine_tuned_model
        if n < 3 or name.endswith("--hang"):
            self.jobs[submission_id] = "RUNNING" if n > 1 else "PENDING"
        elif name.endswith("--gate"):
            stages = {**{k: PASSED[k] for k in ("validate", "tune", "evaluate")}, "gate": {"status": "failed",
                      "error": GATE_REASONS}}  # fmt: skip
            write_summary(self.store, submission_id, stages, "failed")
            self.jobs[submission_id] = "FAILED"
        else:
            write_summary(self.store, submission_id, {**PASSED, "register": {**PASSED["register"], "model": name}})
            self.jobs[submission_id] = "SUCCEEDED"
        return self.jobs[submission_id]

    def stop(self, submission_id: str) -> None:
        super().stop(submission_id)
        self.jobs[submission_id] = "STOPPED"


@pytest.fixture
def server(monkeypatch, tmp_path):
    import uvicorn
    from ray import serve

    from serving.config import ServeArgs
    from serving.http import Api, web
    from tests.serving.test_http import FakeGenerator, Remote

    monkeypatch.setenv(KEY_ENV, KEY)
    args = ServeArgs(champion={"model": None}, default_model="base", api_key_env=KEY_ENV,
                     files={"root": str(tmp_path / "files")}, finetune={"poll_s": 0.05})  # fmt: skip
    api = Api.func_or_class.__mro__[1](Remote(FakeGenerator()), args, Remote(SimpleNamespace()))
    cluster = ScriptedCluster(api.finetune.store)
    api.finetune._submitter = cluster  # before any job exists: the poller has not asked for a submitter yet
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=api))
    http = uvicorn.Server(uvicorn.Config(web, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=http.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not http.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert http.started, "uvicorn did not start within 60 s"
    port = http.servers[0].sockets[0].getsockname()[1]
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", api=api, cluster=cluster, store=api.finetune.store)
    finally:
        http.should_exit = True
        thread.join(30)
        api.finetune.stop()


# ---- packing a folder -----------------------------------------------------------------------------------------
def test_a_folder_is_a_tar_sent_in_bounded_pieces_of_the_announced_size(toy_dataset):
    (toy_dataset / ".DS_Store").write_bytes(b"junk")
    (toy_dataset / "link.png").symlink_to(next(toy_dataset.glob("*.png")))
    entries = tar_entries(toy_dataset)
    pieces = list(tar_stream(entries, chunk=1000))
    assert sum(map(len, pieces)) == tar_size(entries)
    assert max(len(p) for p in pieces) <= max(1000, 1024, *(len(h) for _, h, _ in entries))  # never a whole file
    with tarfile.open(fileobj=io.BytesIO(b"".join(pieces))) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    files = [p for p in toy_dataset.rglob("*") if p.is_file() and not p.is_symlink() and p.name != ".DS_Store"]
    assert got == {f"toy-sks/{p.relative_to(toy_dataset).as_posix()}": p.read_bytes() for p in files}
    body = upload_body(toy_dataset, "fine-tune")
    sent = b"".join(body.chunks())
    assert int(body.headers["Content-Length"]) == len(sent) and b"".join(pieces) in sent
    assert b"".join(body.chunks()) != b"" and b"".join(body.chunks()).count(b"toy-sks/") == len(files)  # restartable


def test_a_retried_upload_sends_the_whole_body_again(monkeypatch, toy_dataset):
    monkeypatch.setattr("serving.client.time.sleep", lambda s: None)
    bodies = []

    def handle(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        if len(bodies) == 1:
            return httpx.Response(503, json={"error": {"message": "busy"}}, headers={"Retry-After": "0"})
        return httpx.Response(200, json={"id": "file-1", "bytes": 1, "created_at": 0, "filename": "toy-sks.tar",
                                         "purpose": "fine-tune", "status": "processed"})  # fmt: skip

    file = Client("http://x", transport=httpx.MockTransport(handle)).upload(toy_dataset)
    assert file.id == "file-1" and len(bodies) == 2 and bodies[0] == bodies[1] and b"metadata.jsonl" in bodies[0]


# ---- the blocking client against the routes -------------------------------------------------------------------
def test_upload_a_folder_and_an_archive_then_list_and_delete(server, toy_dataset, tmp_path):
    with Client(server.url, api_key=KEY) as client:
        folder = client.upload(toy_dataset)
        assert folder.status == "processed" and folder.filename == "toy-sks.tar"
        assert folder.dataset["images"] == 8 and folder.dataset["captions"] and folder.dataset["archive"] == "tar"
        archive = tmp_path / "toy.zip"
        archive.write_bytes(zip_bytes({}, toy_dataset))
        zipped = client.upload(archive)
        assert zipped.dataset["archive"] == "zip" and zipped.bytes == archive.stat().st_size
        assert {f.id for f in client.files()} == {zipped.id, folder.id}  # created in one second: order is a tie
        assert client.delete_file(folder.id) and [f.id for f in client.files()] == [zipped.id]
        with pytest.raises(NotFound):
            client.file(folder.id)
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "notes.txt").write_text("no images here")
        with pytest.raises(BadRequest) as refused:
            client.upload(bad)
        assert refused.value.details.get("problems"), refused.value.details


def test_fine_tune_waits_until_succeeded_showing_each_event_once(server, toy_dataset, capsys):
    with Client(server.url, api_key=KEY) as client:
        file = client.upload(toy_dataset)
        job = client.fine_tune(file, suffix="my-style", hyperparameters={"n_epochs": 2}, seed=3, trigger="sks")
        assert job.status == "queued" and job.seed == 3 and job.hyperparameters["n_epochs"] == 2
        assert 'trigger="sks"' in server.store.load(job.id).overrides
        assert job.wait(timeout=60, poll=0.05) is job
        assert job.status == "succeeded" and job.fine_tuned_model == "default--my-style" and job.error is None
        shown = capsys.readouterr().err
        record = server.store.load(job.id)
        for event in record.events:  # every event, once, in the order they happened
            assert shown.count(f"[{event.level}] {event.message}\n") == 1, event.message
        assert shown.index("stage validate: done") < shown.index("served now")
        [ckpt] = job.checkpoints()
        assert ckpt["fine_tuned_model_checkpoint"] == "default--my-style/3"
        assert list(job.events(page_size=2)) == [e.model_dump() for e in reversed(record.events)]  # every page
        assert len(record.events) > 4
        assert client.job(job.id).status == "succeeded"
        second = client.fine_tune(file.id)
        assert [j.id for j in client.jobs()] == [second.id, job.id]
        with pytest.raises(BadRequest) as refused:
            client.fine_tune(file.id, concept_description="x")  # extras go to the server, which names the field
        assert "concept_description" in str(refused.value)


def test_wait_raises_job_failed_with_the_gates_reasons(server, toy_dataset):
    with Client(server.url, api_key=KEY) as client:
        job = client.fine_tune(client.upload(toy_dataset).id, suffix="gate")
        with pytest.raises(JobFailed) as failed:
            job.wait(timeout=60, poll=0.05, progress=False)
        assert failed.value.code == "gate_failed" and GATE_REASONS in failed.value.reason
        assert GATE_REASONS in str(failed.value) and failed.value.job.status == "failed"


def test_wait_times_out_naming_the_job_and_cancel_ends_it(server, toy_dataset):
    with Client(server.url, api_key=KEY) as client:
        job = client.fine_tune(client.upload(toy_dataset).id, suffix="hang")
        deadline = time.monotonic() + 60
        while job.refresh().status != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=job.id) as timed_out:
            job.wait(timeout=0.3, poll=0.05, progress=False)
        assert isinstance(timed_out.value, JobTimeout) and 0.3 <= time.monotonic() - started < 10
        assert job.cancel().status == "cancelled" and server.cluster.stopped == [job.id]
        with pytest.raises(JobCancelled, match=job.id):
            job.wait(timeout=10, poll=0.05, progress=False)


# ---- the async twins ------------------------------------------------------------------------------------------
def test_the_async_client_uploads_fine_tunes_waits_and_cancels(server, toy_dataset, tmp_path):
    archive = tmp_path / "toy.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(toy_dataset, arcname="toy")

    async def main():
        async with AsyncClient(server.url, api_key=KEY) as client:
            folder, packed = await asyncio.gather(client.upload(toy_dataset), client.upload(archive))
            assert folder.dataset["images"] == packed.dataset["images"] == 8
            assert {f.id for f in await client.files()} == {folder.id, packed.id}
            good, gate, hang = [await client.fine_tune(folder, suffix=s, seed=1) for s in ("ok", "gate", "hang")]
            assert (await good.wait(timeout=60, poll=0.05, progress=False)).fine_tuned_model == "default--ok"
            events = [e async for e in good.events(page_size=2)]
            assert events == [e.model_dump() for e in reversed(server.store.load(good.id).events)]
            assert (await good.checkpoints())[0]["fine_tuned_model_checkpoint"] == "default--ok/3"
            with pytest.raises(JobFailed, match="concept_gain"):
                await gate.wait(timeout=60, poll=0.05, progress=False)
            with pytest.raises(JobTimeout, match=hang.id):
                await hang.wait(timeout=0.2, poll=0.05, progress=False)
            assert (await hang.cancel()).status == "cancelled"
            with pytest.raises(JobCancelled):
                await hang.wait(timeout=10, poll=0.05, progress=False)
            assert [j.id for j in await client.jobs()] == [hang.id, gate.id, good.id]
            assert (await client.job(good.id)).status == "succeeded" and await client.delete_file(packed.id)

    asyncio.run(main())


def test_upload_refuses_a_missing_path_and_an_empty_folder_before_sending(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        upload_body(tmp_path / "nope", "fine-tune")
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(ValueError, match="no file to send"):
        upload_body(tmp_path / "empty", "fine-tune")
    with pytest.raises(FileNotFoundError):
        upload_body(os.fspath(tmp_path / "nope"), "fine-tune")


class Flaky(httpx.HTTPTransport):
    """Refuses the first ``outages`` connections to a job's routes once ``armed`` (the Serve app restarting)."""

    def __init__(self, outages: int):
        super().__init__()
        self.outages, self.refused, self.armed = outages, 0, False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.armed and "/v1/fine_tuning/jobs/" in request.url.path and self.refused < self.outages:
            self.refused += 1
            raise httpx.ConnectError("connection refused", request=request)
        return super().handle_request(request)


def test_wait_rides_out_a_server_that_stops_answering_for_a_while(server, toy_dataset, capsys):
    flaky = Flaky(outages=5)
    with Client(server.url, api_key=KEY, transport=flaky, retries=1, backoff_s=0.01) as client:
        job = client.fine_tune(client.upload(toy_dataset).id, suffix="restart")
        flaky.armed = True
        assert job.wait(timeout=60, poll=0.05).status == "succeeded" and flaky.refused == 5
    assert "server unreachable" in capsys.readouterr().err


def test_a_folder_upload_holds_a_piece_in_memory_not_the_folder(tmp_path):
    import tracemalloc

    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.bin").write_bytes(os.urandom(4 << 20))
    sent = []

    class Drain(httpx.BaseTransport):  # not httpx.MockTransport: it reads the whole body before answering
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            sent.append(sum(len(piece) for piece in request.stream))  # each piece dropped once counted
            return httpx.Response(200, json={"id": "file-1", "bytes": sent[0], "created_at": 0, "filename": "big.tar",
                                             "purpose": "fine-tune", "status": "processed"})  # fmt: skip

    client = Client("http://x", transport=Drain())
    tracemalloc.start()
    try:
        client.upload(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sent[0] > 16 << 20 and peak < 4 << 20, (sent, peak)  # 16 MiB sent, under 4 MiB held at once
