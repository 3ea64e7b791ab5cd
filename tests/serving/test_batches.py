"""Batch generation without Ray: the JSONL check of purpose=batch uploads, the pass queue's priority rule, the runner's
states (complete, retry, cancel, expire, resume after a restart) over a fake generator, and the HTTP routes with
the official openai client and tenant isolation. The batch next to live traffic on a real Serve app is in
tests/serving/test_app.py (test_a_batch_runs_next_to_interactive_traffic).
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.batches.inputs import BatchFileRejected, BatchFiles
from serving.batches.runner import BatchRunner
from serving.batches.store import INPUT, OUTPUT, BatchStore, CreateBatchBody
from serving.config import BatchesArgs, FilesArgs, RequestLimits
from serving.passes import PassQueue
from serving.tenants import Tenant
from serving.uploads.store import FileStore

KEY_ENV, KEY = "LORAFLEET_TEST_BATCH_KEY", "batch-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
URL = "/v1/images/generations"


def line(custom_id: str, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": URL, "body": {"prompt": "a sks"} | body})


def jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_files(root: Path, clock=None, **batches) -> FileStore:
    store = FileStore(FilesArgs(), root=root, clock=clock or Clock())
    store.handlers["batch"] = BatchFiles(BatchesArgs(**batches), RequestLimits())
    return store


def upload(store: FileStore, data: bytes, tenant: str = "acme"):
    return asyncio.run(store.create(io.BytesIO(data), "requests.jsonl", "batch", tenant))


# ---- the input file ------------------------------------------------------------------------------------------
def test_every_bad_line_is_reported_by_line_number_and_field(tmp_path):
    files = make_files(tmp_path / "files")
    lines = [
        line("ok-1", seed=1),
        "{not json",
        json.dumps({"custom_id": "no-prompt", "method": "POST", "url": URL, "body": {"n": 1}}),
        line("typo", colour="red"),
        line("too-many", n=99),
        "",  # blank lines are skipped, numbers kept
        line("ok-1"),  # repeats line 1's custom_id
        json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {"prompt": "a"}}),
        line("url", response_format="url"),
        line("dup-key").replace('"method"', '"custom_id": "y", "method"'),
        line("ok-2", size="64x64", steps=4),
    ]
    with pytest.raises(BatchFileRejected) as info:
        upload(files, jsonl(lines))
    got = {(p.line, p.param) for p in info.value.problems}
    assert got == {(2, None), (3, "body.prompt"), (4, "body.colour"), (5, "body.n"), (7, "custom_id"), (8, "url"),
                   (9, "body.response_format"), (10, "custom_id")}, info.value.problems  # fmt: skip
    assert info.value.bad_lines == 8 and "line 2" in str(info.value) and "see error.problems" in str(info.value)
    assert "line 1" in next(p.message for p in info.value.problems if p.line == 7)
    assert "limits.max_n" in next(p.message for p in info.value.problems if p.line == 5)
    assert not [p for p in (tmp_path / "files").rglob("*") if p.is_file()]  # a refused file leaves nothing


def test_line_and_byte_bounds_and_an_empty_file_are_refused_naming_the_setting(tmp_path):
    files = make_files(tmp_path / "files", max_requests=2, max_file_bytes=1024)
    with pytest.raises(BatchFileRejected, match="batches.max_requests") as info:
        upload(files, jsonl([line(f"r{i}") for i in range(3)]))
    assert [p.line for p in info.value.problems] == [3]
    from serving.uploads.store import UploadTooLarge

    with pytest.raises(UploadTooLarge, match="batches.max_file_bytes"):
        upload(
            files, jsonl([line("big", prompt="x" * 400), line("b2", prompt="y" * 400), line("b3", prompt="z" * 300)])
        )
    with pytest.raises(BatchFileRejected, match="no request lines"):
        upload(files, b"\n\n")
    good = upload(files, jsonl([line("a"), line("b")]))
    assert good.purpose == "batch" and good.status == "processed" and good.dataset is None


# ---- the pass queue's priority rule ----------------------------------------------------------------------------
def test_interactive_items_go_first_and_batch_items_fill_only_the_room_left_within_their_bound():
    passes: list[list[str]] = []

    async def run(items: list[str]) -> list[str]:
        passes.append(items)
        await asyncio.sleep(0.02)
        return items

    def size(item: str) -> int:
        return int(item.split(":")[1])

    async def main():
        queue = PassQueue(run, size=size, max_images=4, low=lambda i: i.startswith("b"), max_low=2)
        first = asyncio.create_task(queue.submit(["i0:1"]))
        await asyncio.sleep(0.005)  # i0 runs; batch items arrive before interactive ones
        waiting = [asyncio.create_task(queue.submit([x])) for x in ("b1:1", "b2:1", "b3:1", "i1:2", "b4:1", "i2:1")]
        await first
        await asyncio.gather(*waiting)
        only_batch = [asyncio.create_task(queue.submit([x])) for x in ("b5:3", "b6:1")]
        await asyncio.gather(*only_batch)

    asyncio.run(main())
    assert passes[0] == ["i0:1"]
    assert passes[1] == ["i1:2", "i2:1", "b1:1"]  # every interactive item, then batch items into the 1 image left
    assert passes[2] == ["b2:1", "b3:1"]  # no interactive: batch items up to max_low (2 images)
    assert passes[3] == ["b4:1"]
    assert passes[4] == ["b5:3"] and passes[5] == ["b6:1"]  # alone, a batch item over max_low still runs


# ---- the runner ------------------------------------------------------------------------------------------------
class FakeGenerator:
    """Answers like Generator.generate: PNG bytes per image; 'fail' in a prompt is a 400; ``busy`` first answers
    are 429 (room full); ``gate`` (a Semaphore) lets as many requests through as it holds, the rest wait."""

    def __init__(self, busy: int = 0, gate: asyncio.Semaphore | None = None):
        self.busy, self.gate, self.seen = busy, gate, []

    async def generate(self, req) -> dict:
        self.seen.append(req)
        if self.busy:
            self.busy -= 1
            return {"error": {"status": 429, "message": "batch room full", "param": None}}
        if self.gate is not None:
            await self.gate.acquire()
        if "raise" in req.prompt:
            raise RuntimeError("the handle broke")
        if "fail" in req.prompt:
            return {"error": {"status": 400, "message": "steps: too many", "param": "steps"}}
        return {"images": [b"\x89PNG" + bytes([i]) for i in range(req.n)], "seeds": [req.seed or 0] * req.n,
                "image_ids": [f"img_{req.seed}_{i}" for i in range(req.n)], "model": req.model or "base",
                "version": None, "size": "64x64"}  # fmt: skip


def make_batch(tmp_path: Path, lines: list[str], tenant: str = "acme", clock=None, **cfg):
    clock = clock or Clock()
    files = make_files(tmp_path / "files", clock)
    file = upload(files, jsonl(lines), tenant)
    store = BatchStore(files.root / "batches", BatchesArgs(**cfg).completion_window_s, clock)
    body = CreateBatchBody(input_file_id=file.id, endpoint=URL, completion_window="24h", metadata={"k": "v"})
    path = files.root / file.id / "content.jsonl"
    record = store.create(Tenant(tenant), body, path, sum(1 for x in lines if x.strip()))
    return files, store, record


def runner_for(files, store, gen, clock=None, concurrency: int = 4, base_model=None, **cfg) -> BatchRunner:
    cfg = BatchesArgs(**({"retry_s": 0.01, "poll_s": 0.05} | cfg))
    return BatchRunner(store, files, cfg, gen.generate, concurrency, clock or store.clock, base_model)


def read_file(files: FileStore, file_id: str, tenant: str = "acme") -> list[dict]:
    from serving.batches.inputs import content_path

    return [json.loads(x) for x in content_path(files, file_id, tenant).read_text().splitlines()]


def test_a_batch_runs_every_request_once_and_ends_completed_with_output_and_error_files(tmp_path):
    lines = [line(f"sku-{i}", seed=i, n=1 + i % 2) for i in range(10)]
    lines += [line("bad", prompt="fail me"), line("broke", prompt="raise")]
    files, store, record = make_batch(tmp_path, lines)
    assert store.view(record)["status"] == "validating" and record.request_counts.total == 12
    gen = FakeGenerator(busy=3)

    async def main():
        runner = runner_for(files, store, gen)
        await runner.step()
        await runner.wait_idle()
        await runner.step()  # an ended batch is not started again, nor read again
        assert not runner.active and runner.ended == {record.id}

    asyncio.run(main())
    done = store.get(record.id, "acme")
    view = store.view(done)
    assert view["object"] == "batch" and view["status"] == "completed" and view["metadata"] == {"k": "v"}
    assert view["request_counts"] == {"total": 12, "completed": 10, "failed": 2}
    assert view["in_progress_at"] and view["finalizing_at"] and view["completed_at"] and "tenant" not in view
    output = read_file(files, done.output_file_id)
    assert sorted(x["custom_id"] for x in output) == sorted(f"sku-{i}" for i in range(10))
    first = next(x for x in output if x["custom_id"] == "sku-1")
    assert first["response"]["status_code"] == 200 and first["id"].startswith("batch_req_")
    assert [d["seed"] for d in first["response"]["body"]["data"]] == [1, 1] and first["response"]["body"]["data"][0][
        "id"
    ] == "img_1_0"
    errors = read_file(files, done.error_file_id)
    assert sorted((e["custom_id"], e["response"]["status_code"]) for e in errors) == [("bad", 400), ("broke", 500)]
    assert next(e for e in errors if e["custom_id"] == "bad")["response"]["body"]["error"]["param"] == "steps"
    assert len(gen.seen) == 12 + 3  # three 429s were sent again, each request ran once
    assert all(r.tenant == Tenant("acme") for r in gen.seen)
    assert files.get(done.output_file_id, "acme").purpose == "batch_output"


def test_cancel_stops_a_running_batch_keeping_finished_results_and_listing_the_rest(tmp_path):
    files, store, record = make_batch(tmp_path, [line(f"r{i}", seed=i) for i in range(8)])

    async def main():
        gen = FakeGenerator(gate=asyncio.Semaphore(2))  # two requests finish, the next ones hold
        runner = runner_for(files, store, gen, concurrency=2)
        await runner.step()
        await asyncio.sleep(0.05)
        store.request_cancel(record.id, "acme")
        assert store.view(store.get(record.id, "acme"))["status"] == "cancelling"
        await runner.step()
        await runner.wait_idle()

    asyncio.run(main())
    done = store.get(record.id, "acme")
    assert done.status == "cancelled" and done.cancelled_at and done.cancelling_at
    finished = {x["custom_id"] for x in read_file(files, done.output_file_id)}
    skipped = {x["custom_id"]: x["error"]["code"] for x in read_file(files, done.error_file_id)}
    assert len(finished) == 2 and finished | set(skipped) == {f"r{i}" for i in range(8)} and not finished & set(skipped)
    assert set(skipped.values()) == {"batch_cancelled"}
    from serving.batches.store import BatchRequestError

    with pytest.raises(BatchRequestError, match="'cancelled'"):
        store.request_cancel(record.id, "acme")


def test_two_runners_on_one_files_root_never_run_a_batch_twice_nor_another_models(tmp_path):
    files, store, record = make_batch(tmp_path, [line(f"r{i}", seed=i) for i in range(6)])
    body = CreateBatchBody(input_file_id=record.input_file_id, endpoint=URL, completion_window="24h")
    other = store.create(Tenant("acme"), body, store.folder(record.id) / INPUT, 6, base_model="models/sdxl")
    first, second = FakeGenerator(gate=asyncio.Semaphore(0)), FakeGenerator()

    async def main():
        a = runner_for(files, store, first, base_model="models/toy-sd")
        b = runner_for(files, store, second, base_model="models/toy-sd")
        await a.step()
        await asyncio.sleep(0.02)
        await b.step()  # the batch is a's (its lock); the other batch is another model's
        assert set(a.active) == {record.id} and not b.active
        for _ in range(6):
            first.gate.release()
        await a.wait_idle()

    asyncio.run(main())
    assert sorted(r.seed for r in first.seen) == list(range(6)) and second.seen == []
    assert store.get(record.id, "acme").status == "completed" and store.get(other.id, "acme").status == "validating"


def test_another_models_batch_that_nobody_runs_still_ends_when_cancelled_or_past_its_window(tmp_path):
    """No app serving its base model is left (apps share files.root): the batch is not drawn here, but a cancel or
    its window still ends it — every request listed as skipped — instead of `validating` for ever."""
    clock = Clock()
    files, store, mine = make_batch(tmp_path, [line(f"r{i}", seed=i) for i in range(3)], clock=clock)
    body = CreateBatchBody(input_file_id=mine.input_file_id, endpoint=URL, completion_window="24h")
    cancelled = store.create(Tenant("acme"), body, store.folder(mine.id) / INPUT, 3, base_model="models/sdxl")
    waiting = store.create(Tenant("acme"), body, store.folder(mine.id) / INPUT, 3, base_model="models/sdxl")
    gen = FakeGenerator()

    async def main():
        runner = runner_for(files, store, gen, clock, base_model="models/toy-sd")
        store.request_cancel(cancelled.id, "acme")
        await runner.step()
        await runner.wait_idle()
        assert store.get(waiting.id, "acme").status == "validating"  # its app may still come back within the window
        clock.now += 86400 + 1
        await runner.step()
        await runner.wait_idle()

    asyncio.run(main())
    assert sorted(r.seed for r in gen.seen) == [0, 1, 2]  # only this app's own batch was drawn
    for record, end in ((cancelled, "cancelled"), (waiting, "expired")):
        done = store.get(record.id, "acme")
        assert done.status == end and done.output_file_id is None and done.in_progress_at is None, done
        assert getattr(done, f"{end}_at") and done.request_counts.total == 3
        assert {x["error"]["code"] for x in read_file(files, done.error_file_id)} == {f"batch_{end}"}


def test_a_runner_that_read_a_batch_before_its_owner_finished_it_leaves_it_finished(tmp_path):
    """The list of batches is read before the lock is taken: the lock holder may end the batch in between. The record
    is read again under the lock, so a completed batch is never ended a second time (here: as expired)."""
    clock = Clock()
    files, store, mine = make_batch(tmp_path, [line(f"r{i}", seed=i) for i in range(3)], clock=clock)
    body = CreateBatchBody(input_file_id=mine.input_file_id, endpoint=URL, completion_window="24h")
    foreign = store.create(Tenant("acme"), body, store.folder(mine.id) / INPUT, 3, base_model="models/sdxl")

    async def main():
        owner = runner_for(files, store, FakeGenerator(), clock, base_model="models/sdxl")
        other = runner_for(files, store, FakeGenerator(), clock, base_model="models/toy-sd")
        await owner.step()
        stale = store.load(foreign.id)  # what `other` read ...
        clock.now += 86400 + 1  # ... then the window passed, and the owner finished the batch first
        await owner.wait_idle()
        other._unended = lambda: [stale]
        await other.step()
        await other.wait_idle()

    asyncio.run(main())
    done = store.load(foreign.id)
    assert done.status == "completed" and done.completed_at and done.expired_at is None, done


def test_a_batch_past_its_window_expires(tmp_path):
    clock = Clock()
    files, store, record = make_batch(tmp_path, [line(f"r{i}") for i in range(3)], clock=clock)
    clock.now += 86400 + 1

    async def main():
        runner = runner_for(files, store, FakeGenerator(), clock)
        await runner.step()
        await runner.wait_idle()

    asyncio.run(main())
    done = store.get(record.id, "acme")
    assert done.status == "expired" and done.output_file_id is None and done.expired_at
    assert {x["error"]["code"] for x in read_file(files, done.error_file_id)} == {"batch_expired"}


def test_a_restarted_runner_resumes_without_running_a_finished_request_again(tmp_path):
    files, store, record = make_batch(tmp_path, [line(f"r{i}", seed=i) for i in range(5)])
    folder = store.folder(record.id)
    record.status = "in_progress"
    store.save(record)
    before = [json.dumps({"custom_id": f"r{i}", "response": {"status_code": 200}}) for i in (0, 1)]
    (folder / OUTPUT).write_text("\n".join(before) + '\n{"custom_id": "r2", "respo')  # cut off mid-line
    gen = FakeGenerator()

    async def main():
        runner = runner_for(files, store, gen)
        await runner.step()
        await runner.wait_idle()

    asyncio.run(main())
    assert sorted(r.seed for r in gen.seen) == [2, 3, 4]
    done = store.get(record.id, "acme")
    assert done.status == "completed" and done.request_counts.completed == 5
    assert sorted(x["custom_id"] for x in read_file(files, done.output_file_id)) == [f"r{i}" for i in range(5)]
    (folder / INPUT).unlink()  # the held input is the batch's own link: the upload stays
    assert files.get(record.input_file_id, "acme").purpose == "batch"


# ---- HTTP ------------------------------------------------------------------------------------------------------
@pytest.fixture
def http(monkeypatch, tmp_path):
    """The ingress under TestClient (tenant 'default'), no runner deployment: tests drive ``BatchRunner``."""
    from fastapi.testclient import TestClient
    from ray import serve

    from serving.config import ServeArgs
    from serving.http import Api, web
    from tests.serving.test_http import FakeGenerator as HttpGenerator
    from tests.serving.test_http import Remote

    monkeypatch.setenv(KEY_ENV, KEY)
    args = ServeArgs(champion={"model": None}, default_model="base", api_key_env=KEY_ENV,
                     files={"root": str(tmp_path / "files")}, batches={"retry_s": 0.01})  # fmt: skip
    gen = HttpGenerator()
    api = Api.func_or_class.__mro__[1](Remote(gen), args, Remote(SimpleNamespace()))
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=api))

    def run_batches() -> None:
        async def main():
            runner = BatchRunner(api.batches.store, api.files, args.batches, lambda r: gen.generate(r), 4)
            await runner.step()
            await runner.wait_idle()

        asyncio.run(main())

    with TestClient(web, headers=AUTH) as client:
        yield SimpleNamespace(client=client, api=api, run=run_batches, gen=gen)


def test_the_official_openai_client_uploads_runs_and_downloads_a_batch(http, tmp_path):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http.client, max_retries=0)
    path = tmp_path / "catalogue.jsonl"
    path.write_bytes(jsonl([line(f"sku-{i}", seed=i) for i in range(4)]))
    with path.open("rb") as f:
        file = client.files.create(file=f, purpose="batch")
    assert file.purpose == "batch" and file.status == "processed"
    batch = client.batches.create(input_file_id=file.id, endpoint=URL, completion_window="24h",
                                  metadata={"run": "nightly"})  # fmt: skip
    assert batch.status == "validating" and batch.request_counts.total == 4
    http.run()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 4 and batch.metadata == {"run": "nightly"}
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in out) == [f"sku-{i}" for i in range(4)]
    assert all(x["response"]["body"]["data"][0]["b64_json"] for x in out)
    assert [b.id for b in client.batches.list()] == [batch.id]
    with pytest.raises(openai.BadRequestError, match="has status 'completed'"):
        client.batches.cancel(batch.id)
    assert client.files.content(file.id).text == path.read_text()  # the input file too
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("bad.jsonl", jsonl([line("a", n=0)])), purpose="batch")
    assert info.value.body["code"] == "invalid_batch_file" and info.value.body["problems"][0]["param"] == "body.n"


def test_batches_and_their_files_are_visible_only_to_their_tenant(http, tmp_path):
    ours = http.client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("a.jsonl", jsonl([line("a")]))})
    assert ours.status_code == 200, ours.text
    theirs_file = upload(http.api.files, jsonl([line("t")]), tenant="globex")
    body = {"input_file_id": theirs_file.id, "endpoint": URL, "completion_window": "24h"}
    refused = http.client.post("/v1/batches", json=body)  # another tenant's file reads as a missing one
    assert refused.status_code == 404 and refused.json()["error"]["param"] == "input_file_id", refused.text
    assert http.client.get(f"/v1/files/{theirs_file.id}/content").status_code == 404
    theirs = http.api.batches.store.create(Tenant("globex"), CreateBatchBody(**body),
                                           http.api.files.root / theirs_file.id / "content.jsonl", 1)  # fmt: skip
    for method, path in [("get", f"/v1/batches/{theirs.id}"), ("post", f"/v1/batches/{theirs.id}/cancel")]:
        r = getattr(http.client, method)(path)
        assert r.status_code == 404 and "GET /v1/batches" in r.json()["error"]["message"], r.text
    mine = http.client.post("/v1/batches", json=body | {"input_file_id": ours.json()["id"]}).json()
    assert [b["id"] for b in http.client.get("/v1/batches").json()["data"]] == [mine["id"]]
    cancelled = http.client.post(f"/v1/batches/{mine['id']}/cancel").json()
    assert cancelled["status"] == "cancelling" and cancelled["cancelling_at"]
    assert http.api.batches.store.load(theirs.id).status == "validating"  # untouched


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"endpoint": URL, "completion_window": "24h"}, 400, "input_file_id"),
        ({"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h"}, 400, "endpoint"),
        ({"input_file_id": "file-x", "endpoint": URL, "completion_window": "1h"}, 400, "completion_window"),
        ({"input_file_id": "file-0123", "endpoint": URL, "completion_window": "24h"}, 404, "input_file_id"),
    ],
)
def test_bad_batch_requests_are_refused_naming_the_field(http, body, status, param):
    r = http.client.post("/v1/batches", json=body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_a_fine_tuning_file_is_no_batch_input_and_has_no_content(http, toy_dataset):
    from tests.serving.test_files import zip_bytes

    r = http.client.post(
        "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("d.zip", zip_bytes({}, toy_dataset))}
    )
    file_id = r.json()["id"]
    body = {"input_file_id": file_id, "endpoint": URL, "completion_window": "24h"}
    refused = http.client.post("/v1/batches", json=body)
    assert refused.status_code == 400 and "purpose=batch" in refused.json()["error"]["message"], refused.text
    assert http.client.get(f"/v1/files/{file_id}/content").status_code == 400


def test_a_replica_refuses_batch_requests_past_its_bound_at_once_and_never_interactive_ones():
    """``Generator.generate`` with ``priority="batch"``: at most ``batches.max_in_flight_per_replica`` held; the
    next gets 429 at once (the runner resends it later); interactive requests are not counted."""
    from serving.app import Generator
    from serving.batches.runner import batch_room
    from serving.config import ServeArgs

    replica = Generator.func_or_class.__new__(Generator.func_or_class)  # the class without Ray or an engine
    replica.args = ServeArgs(champion={"model": None}, default_model="base", batches={"max_in_flight_per_replica": 2})
    replica._batch_requests, replica._batch_room = 0, 2
    assert batch_room(replica.args) == 2
    tight = ServeArgs(champion={"model": None}, default_model="base", deployment={"max_ongoing_requests": 1},
                      batching={"max_batch_size": 1, "max_concurrent_batches": 1}, limits={"max_n": 1})  # fmt: skip
    assert batch_room(tight) == 1  # at most half the slots, but never none
    held: list[tuple[bool, asyncio.Event]] = []

    async def generate(req, epoch, low):  # stands for the real path: canary arm, prepare, pass queue, engine
        held.append((low, asyncio.Event()))
        await held[-1][1].wait()
        return {"images": [], "low": low}

    replica._routed = generate

    async def main():
        batch = [asyncio.create_task(replica.generate(object(), 0, "batch")) for _ in range(2)]
        live = [asyncio.create_task(replica.generate(object())) for _ in range(3)]
        await asyncio.sleep(0)
        refused = await replica.generate(object(), 0, "batch")
        for _, event in held:
            event.set()
        done = await asyncio.gather(*batch, *live)
        again = asyncio.create_task(replica.generate(object(), 0, "batch"))  # room again once they finished
        await asyncio.sleep(0)
        held[-1][1].set()
        return refused, done, await again

    refused, done, again = asyncio.run(main())
    assert refused["error"]["status"] == 429 and "batch room" in refused["error"]["message"]
    assert [d["low"] for d in done] == [True, True, False, False, False] and again["low"] is True
    assert replica._batch_requests == 0
