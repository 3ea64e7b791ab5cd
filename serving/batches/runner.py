"""The batch runner: feeds each batch's requests to the generator replicas as low-priority work. Plain asyncio;
the Ray side is the ``send`` coroutine it is given (``serving.batches.deployment``: a Serve handle call with
``priority="batch"``; tests pass fakes).

    runner = BatchRunner(store, files, cfg, send, concurrency=8)
    await runner.run_forever()        # or: await runner.step() in tests, which also starts what is new

Why the generator replicas and not Ray Data over separate engine actors: the replicas already hold the model and
its adapters, and only a replica's own pass queue can put batch images into the room interactive requests leave in a
UNet pass (``serving.passes.PassQueue``: interactive items first, batch items fill what is left); separate engine
actors would compete with the replicas for the same GPUs with nothing to bound the interactive latency they cost.
Batch capacity grows with the replicas (autoscaling counts the batch requests too), so a large catalogue uses the
whole deployment.

Flow control: at most ``concurrency`` requests are out at once (``batch_room`` × replicas);
a replica whose batch room is full answers 429 at once and the request is sent again after ``batches.retry_s``;
a 503 or a replica that went away is retried up to ``batches.max_attempts``; any other answer is final. Every
finished request is appended to the batch's ``output.jsonl`` (200) or ``errors.jsonl`` at once, so a restarted
runner resumes where it was (``BatchStore``). Batches share the slots first come, first served per request, so
one tenant's large batch does not hold back another's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

from serving.batches.inputs import BatchLine, read_lines, write_output_file
from serving.batches.store import END, ERRORS, INPUT, OUTPUT, TERMINAL, BatchRecord, BatchStore
from serving.config import BatchesArgs, ServeArgs
from serving.image_request import ImageRequest
from serving.schemas import error_body
from serving.uploads.store import FileNotFound, FileStore, write_json

log = logging.getLogger(__name__)
Send = Callable[[ImageRequest], Awaitable[dict]]
BUSY = 429  # a replica's batch room is full: sent again later, not an attempt
RETRYABLE = (503,)


def batch_room(args: ServeArgs) -> int:
    """Batch requests one generator replica holds at once: ``batches.max_in_flight_per_replica``, and at most half
    of ``deployment.max_ongoing_requests`` (at least 1), so interactive requests always find free slots."""
    return min(args.batches.max_in_flight_per_replica, max(1, args.deployment.max_ongoing_requests // 2))


def request_line_id(batch_id: str, custom_id: str) -> str:
    """The output line's ``id`` (OpenAI: ``batch_req_…``), stable across restarts."""
    return "batch_req_" + hashlib.sha256(f"{batch_id}/{custom_id}".encode()).hexdigest()[:24]


def result_line(batch_id: str, line: BatchLine, out: dict, request_id: str, now: float) -> tuple[bool, dict]:
    """(ok, the output/error file line) for one answer of ``Generator.generate``.

    A 200 carries the live route's response body (``ImagesResponse``: each image as ``b64_json``, its seed, the
    image id when the replica made one); an error carries OpenAI's error body with the replica's status."""
    if "error" in out:
        e = out["error"]
        response = {"status_code": e["status"], "request_id": request_id,
                    "body": error_body(e["status"], e["message"], e.get("param"))}  # fmt: skip
        return False, {"id": request_line_id(batch_id, line.custom_id), "custom_id": line.custom_id,
                       "response": response, "error": None}  # fmt: skip
    ids = out.get("image_ids") or [None] * len(out["images"])
    data = [
        {"b64_json": base64.b64encode(png).decode(), "seed": seed, "revised_prompt": line.body.prompt}
        | ({"id": image_id} if image_id else {})
        for png, seed, image_id in zip(out["images"], out["seeds"], ids)
    ]
    body = {"created": int(now), "data": data, "model": out["model"], "version": out["version"],
            "output_format": "png", "size": out["size"]}  # fmt: skip
    return True, {"id": request_line_id(batch_id, line.custom_id), "custom_id": line.custom_id,
                  "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}  # fmt: skip


def _append(path: Path, value: dict) -> None:
    """One JSON line, in one write (a crash leaves at most a partial last line, dropped on resume)."""
    with open(path, "ab") as f:
        f.write(json.dumps(value, separators=(",", ":")).encode() + b"\n")


def _done_ids(path: Path) -> list[str]:
    """The custom_ids of the whole lines of a progress file; a partial last line (a crash mid-write) is cut off."""
    if not path.exists():
        return []
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    return [json.loads(raw)["custom_id"] for raw in whole.splitlines() if raw.strip()]


def _claim(folder: Path) -> IO | None:
    """An exclusive ``flock`` on ``folder/lock`` (the open file holds it), or None when another process has it."""
    f = open(folder / "lock", "a")  # noqa: SIM115 - kept open while the batch runs
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


class _Active:
    """One running batch: its record, counters and the tasks of its requests in flight."""

    def __init__(self, record: BatchRecord):
        self.record = record
        self.tasks: set[asyncio.Task] = set()
        self.stop: str | None = None  # "cancelled" or "expired" once asked
        self.saved = 0.0
        self.task: asyncio.Task | None = None
        self.lock: IO | None = None  # the open lock file whose flock says this runner runs the batch


class BatchRunner:
    """See the module docstring.

    Args:
        store: the batches on disk.
        files: where output and error files are kept (the ``/v1/files`` store).
        cfg: the ``batches`` section.
        send: ``await send(request)`` -> ``Generator.generate``'s dict (``{"error": {status, message, param}}`` on
            failure; a replica that went away must come back as a 503 error, not raise).
        concurrency: requests out at once over all batches.
        clock: Unix seconds.
        base_model: run only batches created on an app serving this base model (None: every batch).
    """

    def __init__(self, store: BatchStore, files: FileStore, cfg: BatchesArgs, send: Send, concurrency: int,
                 clock: Callable[[], float] = time.time, base_model: str | None = None):  # fmt: skip
        self.store, self.files, self.cfg, self.send, self.clock = store, files, cfg, send, clock
        self.base_model = base_model
        self.slots = asyncio.Semaphore(concurrency)
        self.active: dict[str, _Active] = {}
        self.ended: set[str] = set()  # batch ids seen ended: never read again
        self.wakeup = asyncio.Event()

    async def run_forever(self) -> None:
        """``step`` every ``batches.poll_s`` (sooner after ``wake``), until cancelled."""
        while True:
            try:
                await self.step()
            except Exception:  # noqa: BLE001 - one bad look at the disk must not end the runner
                log.exception("batch runner: step failed; tried again")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), self.cfg.poll_s)
            self.wakeup.clear()

    def wake(self) -> None:
        """Look at the disk now (a batch was created or cancelled)."""
        self.wakeup.set()

    async def step(self) -> None:
        """Start every batch that has not ended and is not running (new ones, and those a restart cut off), and
        stop the running ones that were cancelled or expired."""
        now = self.clock()
        for record in await asyncio.to_thread(self._unended):
            active = self.active.get(record.id)
            if active is None and record.status not in TERMINAL:
                # another app's batch (apps may share files.root) is left to it, unless it was cancelled or its window
                # passed while no runner held it (that app is gone): then it ends here, nothing drawn
                foreign = None not in (self.base_model, record.base_model) and self.base_model != record.base_model
                if foreign and self._end_of(record, now) is None:
                    continue
                lock = _claim(self.store.folder(record.id))
                if lock is None:
                    continue  # another runner (another app on this files.root) has it
                # read again under the lock: the runner that held it may have ended it since the list was read
                record = await asyncio.to_thread(self.store.load, record.id)
                end = self._end_of(record, now) if foreign and record is not None else None
                if record is None or record.status in TERMINAL or (foreign and end is None):
                    lock.close()
                    continue
                active = self.active[record.id] = _Active(record)
                active.lock = lock
                if end is not None:
                    self._stop(active, end)  # before its task starts: every request is listed as skipped
                active.task = asyncio.create_task(self._run(active))
            if active is None or active.stop:
                continue
            if self.store.cancel_requested_at(record.id) is not None:
                self._stop(active, "cancelled")
            elif now >= active.record.expires_at:
                self._stop(active, "expired")

    def _end_of(self, record: BatchRecord, now: float) -> str | None:
        """``cancelled`` / ``expired`` when a batch must end whether or not it ran, else None."""
        if self.store.cancel_requested_at(record.id) is not None:
            return "cancelled"
        return "expired" if now >= record.expires_at else None

    def _unended(self) -> list[BatchRecord]:
        """The records of batches not seen ended yet, oldest first (an ended batch is not read again)."""
        found = []
        for batch_id in self.store.ids():
            if batch_id in self.ended:
                continue
            active = self.active.get(batch_id)  # this runs in a worker thread: one look at the dict
            record = active.record if active is not None else self.store.load(batch_id)
            if record is not None and record.status in TERMINAL and active is None:
                self.ended.add(batch_id)
            elif record is not None:
                found.append(record)
        return sorted(found, key=lambda r: (r.order, r.id))

    async def wait_idle(self) -> None:
        """Wait until every running batch has ended (tests)."""
        while self.active:
            await asyncio.gather(*(a.task for a in list(self.active.values()) if a.task), return_exceptions=True)

    def _stop(self, active: _Active, why: str) -> None:
        active.stop = why
        if why == "cancelled" and active.record.status != "finalizing":
            active.record.status, active.record.cancelling_at = "cancelling", int(self.clock())
            self.store.save(active.record)
        for task in list(active.tasks):
            task.cancel()  # the replica sees the caller go: a waiting request is skipped, never drawn

    # ---- one batch -------------------------------------------------------------------------------------------
    async def _run(self, active: _Active) -> None:
        record = active.record
        folder = self.store.folder(record.id)
        try:
            if record.status == "finalizing":
                return await self._finalize(active)
            done = set(_done_ids(folder / OUTPUT)) | set(_done_ids(folder / ERRORS))
            ok = len(_done_ids(folder / OUTPUT))
            record.request_counts.completed, record.request_counts.failed = ok, len(done) - ok
            try:
                lines = list(read_lines(folder / INPUT))
            except (OSError, ValueError) as exc:  # the tenant sees the kind of fault, the log its paths and text
                log.exception("batch %s: its input file could not be read", record.id)
                return await self._fail(active, "invalid_input", f"the input file could not be read on the server "
                                        f"({type(exc).__name__}); upload it again and create a new batch")  # fmt: skip
            record.request_counts.total = len(lines)
            if record.status == "validating" and not active.stop:
                record.status, record.in_progress_at = "in_progress", int(self.clock())
            self.store.save(record)
            for line in lines:
                if active.stop:
                    break
                if line.custom_id in done:
                    continue
                await self.slots.acquire()
                if active.stop:
                    self.slots.release()
                    break
                task = asyncio.create_task(self._one(active, line))
                active.tasks.add(task)
                task.add_done_callback(lambda t: (active.tasks.discard(t), self.slots.release()))
            while active.tasks:
                await asyncio.gather(*list(active.tasks), return_exceptions=True)
            await self._finalize(active)
        except Exception as exc:  # noqa: BLE001 - a batch that cannot go on fails with the reason, others go on
            log.exception("batch %s failed", record.id)
            await self._fail(active, "runner_error", f"the server failed running this batch ({type(exc).__name__}); "
                             "create it again")  # fmt: skip
        finally:
            self.active.pop(record.id, None)
            if active.lock is not None:
                active.lock.close()  # releases the flock

    async def _one(self, active: _Active, line: BatchLine) -> None:
        record, attempts = active.record, 0
        request = line.body.to_request(record.tenant_object())
        while True:
            try:
                out = await self.send(request)
            except Exception as exc:  # noqa: BLE001 - an unexpected failure is this request's answer, not a lost line
                log.exception("batch %s: request %s failed", record.id, line.custom_id[:64])
                # as the live route's 500: the kind of fault, not its text (a RayTaskError's holds server paths)
                out = {"error": {"status": 500, "message": f"the server failed on this request ({type(exc).__name__}); "
                                 "send it again in a new batch", "param": None}}  # fmt: skip
            status = out.get("error", {}).get("status")
            if status == BUSY or (status in RETRYABLE and attempts + 1 < self.cfg.max_attempts):
                attempts += status != BUSY
                await asyncio.sleep(self.cfg.retry_s)
                continue
            break
        ok, value = result_line(record.id, line, out, request.request_id, self.clock())
        _append(self.store.folder(record.id) / (OUTPUT if ok else ERRORS), value)
        counts = record.request_counts
        counts.completed, counts.failed = counts.completed + ok, counts.failed + (not ok)
        if self.clock() - active.saved >= self.cfg.progress_every_s:
            active.saved = self.clock()
            await asyncio.to_thread(self.store.save, record)

    async def _fail(self, active: _Active, code: str, message: str) -> None:
        record = active.record
        record.status, record.failed_at = "failed", int(self.clock())
        record.errors = [{"code": code, "message": message, "param": None, "line": None}]
        self.store.save(record)

    async def _finalize(self, active: _Active) -> None:
        """Store the output and error files and end the batch: ``completed``, or ``cancelled`` / ``expired`` with
        every request that did not finish listed in the error file (``error.code`` batch_cancelled /
        batch_expired, no ``response``)."""
        record, folder = active.record, self.store.folder(active.record.id)
        if record.status != "finalizing":  # how it ends is kept on disk first: a restart finishes it the same way
            write_json(folder / END, {"end": active.stop or "completed"})
            record.status, record.finalizing_at = "finalizing", int(self.clock())
            self.store.save(record)
        end = json.loads((folder / END).read_text())["end"]
        if end != "completed":
            finished = set(_done_ids(folder / OUTPUT)) | set(_done_ids(folder / ERRORS))
            for line in read_lines(folder / INPUT):
                if line.custom_id not in finished:
                    _append(folder / ERRORS, {"id": request_line_id(record.id, line.custom_id),
                                              "custom_id": line.custom_id, "response": None,
                                              "error": {"code": f"batch_{end}", "message": f"the batch was {end} "
                                                        "before this request ran"}})  # fmt: skip
        record.output_file_id = await asyncio.to_thread(self._keep, record, OUTPUT, "output")
        record.error_file_id = await asyncio.to_thread(self._keep, record, ERRORS, "error")
        record.status = end
        setattr(record, {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[end],
                int(self.clock()))  # fmt: skip
        self.store.save(record)

    def _keep(self, record: BatchRecord, name: str, kind: str) -> str | None:
        """Move a progress file into the file store (id derived from the batch: a restart finds it again)."""
        source = self.store.folder(record.id) / name
        file_id = "file-" + hashlib.sha256(f"{record.id}/{kind}".encode()).hexdigest()[:24]
        try:
            self.files.get(file_id, record.tenant)
            return file_id  # kept before a restart
        except FileNotFound:
            pass
        if not source.exists() or source.stat().st_size == 0:
            return None
        write_output_file(self.files, record.tenant, f"{record.id}_{kind}.jsonl", source, file_id)
        return file_id


def send_with(call: Callable[[ImageRequest], Awaitable[dict]], gone: tuple[type[BaseException], ...],
              log_name: str = "batch") -> Send:  # fmt: skip
    """``send`` over a call that may raise ``gone`` (a replica that went away, backpressure): those become a 503
    error answer, which the runner retries."""

    async def send(request: ImageRequest) -> dict:
        try:
            return await call(request)
        except gone as exc:
            log.warning("%s request: %s; sent again", log_name, type(exc).__name__)
            return {"error": {"status": 503, "message": f"the generator did not answer ({type(exc).__name__})",
                              "param": None}}  # fmt: skip

    return send
