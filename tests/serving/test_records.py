"""Generation records (serving/records.py): the recorder never blocks or fails a request, drops are counted, sampling
is per request id; traces written to a real MLflow store read back by ``lorafleet generations``."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import pytest

from serving.records import (
    GenerationRecord,
    MlflowSink,
    Recorder,
    RecordsArgs,
    outcome_kind,
    percentile,
    redact,
    sampled,
)


def rec(i: int = 0, *, model: str = "m", version: str = "1", outcome: str = "ok", latency: float = 1.0, **kw):
    values = dict(time=time.time(), request_id=f"req-{i}", tenant="acme", model=model, version=version,
                  prompt=f"prompt {i % 3}", negative_prompt="", seed=i, steps=4, size="64x64", guidance=4.0, n=1,
                  latency_s=latency, queue_wait_s=0.01, batch_images=2, outcome=outcome, seeds=[i],
                  image_ids=[f"img_{i}"])  # fmt: skip
    return GenerationRecord(**(values | kw))


class FakeSink:
    name = "fake"

    def __init__(self, fail: Exception | None = None, hang: threading.Event | None = None):
        self.written: list[GenerationRecord] = []
        self.summaries: list[tuple[list, int]] = []
        self.fail, self.hang, self.calls = fail, hang, 0

    def write(self, r: GenerationRecord) -> None:
        self.calls += 1
        if self.hang is not None:
            self.hang.wait(30)
        if self.fail is not None:
            raise self.fail
        self.written.append(r)

    def summarize(self, rows, step: int) -> None:
        if self.fail is not None:
            raise self.fail
        self.summaries.append((rows, step))

    def finish(self) -> None:
        self.calls += 1
        if self.hang is not None:
            self.hang.wait(30)
        self.finished = True


def args(**kw) -> RecordsArgs:
    return RecordsArgs(**({"summary_every_s": 0} | kw))


def test_a_full_buffer_drops_and_counts_instead_of_growing():
    drops = []
    sink = FakeSink()
    r = Recorder(args(buffer_size=3), sink, on_drop=lambda n, why: drops.append((n, why)), start=False)
    for i in range(5):
        r.record(rec(i))
    s = r.stats()
    assert (s["recorded"], s["buffered"], s["dropped"]) == (5, 3, {"buffer_full": 2})
    assert drops == [(1, "buffer_full"), (1, "buffer_full")]
    r.flush_once()
    assert [x.request_id for x in sink.written] == ["req-0", "req-1", "req-2"]
    assert r.stats()["written"] == 3 and r.stats()["buffered"] == 0
    assert r.stats()["versions"]["m/1"]["generations"] == 5  # aggregates count every request, dropped or not


def test_sink_exceptions_never_reach_the_caller_and_are_logged_once(caplog):
    sink = FakeSink(fail=ConnectionError("connection refused"))
    r = Recorder(args(retry_s=0.01), sink, start=False)
    with caplog.at_level(logging.WARNING, logger="serving.records"):
        for i in range(3):
            r.record(rec(i))
            r.flush_once()
            time.sleep(0.02)  # past retry_s: each round tries the sink again
    s = r.stats()
    assert sink.calls == 3 and s["dropped"] == {"sink_failed": 3} and s["errors"] == 3
    assert "ConnectionError: connection refused" in s["last_error"]
    assert len([m for m in caplog.messages if "generation records" in m]) == 1


def test_after_a_failure_the_sink_is_left_alone_for_retry_s():
    sink = FakeSink(fail=OSError("down"))
    r = Recorder(args(retry_s=60), sink, start=False)
    r.record(rec(0))
    r.flush_once()
    for i in range(1, 4):
        r.record(rec(i))
        r.flush_once()
    assert sink.calls == 1  # the three later rounds did not call it
    assert r.stats()["buffered"] == 3 and r.stats()["sink_down_for_s"] > 50


def test_a_hanging_sink_holds_the_writer_for_deadline_s_and_is_not_joined_by_a_second_call():
    release = threading.Event()
    sink = FakeSink(hang=release)
    r = Recorder(args(deadline_s=0.2, retry_s=0.01), sink, start=False)
    r.record(rec(0))
    r.record(rec(1))
    started = time.monotonic()
    r.flush_once()  # rec 0 times out; rec 1 waits for retry_s
    assert 0.15 < time.monotonic() - started < 1.0
    time.sleep(0.05)
    r.flush_once()  # rec 1: the first call still hangs -> dropped at once, no second thread
    assert sink.calls == 1 and r.stats()["dropped"] == {"sink_failed": 1, "sink_busy": 1}
    started = time.monotonic()
    r.close()  # the sink still hangs: the last summary and finish are skipped, close returns at once
    assert time.monotonic() - started < 1.0 and sink.calls == 1 and not hasattr(sink, "finished")
    release.set()


def test_close_sends_the_last_summary_and_finishes_the_sink_and_a_failing_one_is_counted():
    sink = FakeSink()
    r = Recorder(args(summary_every_s=3600), sink)  # with its writer thread, as on a replica
    r.record(rec(0))
    r.close()
    assert sink.finished and [step for _, step in sink.summaries] == [1] and r._thread.is_alive() is False
    r.close()  # a second close (Serve's shutdown, then garbage collection) does nothing
    assert [step for _, step in sink.summaries] == [1]
    quiet = FakeSink()
    r = Recorder(args(summary_every_s=0), quiet, start=False)  # summaries off: none at close either
    r.record(rec(0))
    r.close()
    assert quiet.summaries == [] and quiet.finished
    failing = FakeSink(fail=RuntimeError("mlflow down"))
    r = Recorder(args(retry_s=0.01, summary_every_s=3600), failing, start=False)
    r.record(rec(0))
    r.close()  # the summary fails: counted, not raised, and finish is not tried on a sink that is down
    assert r.stats()["errors"] == 1 and not hasattr(failing, "finished")


def test_a_failing_record_or_ratings_source_is_counted_not_raised():
    r = Recorder(args(), FakeSink(), ratings=lambda: 1 / 0, start=False)
    r.record(None)  # a bug in building a record: AttributeError inside record()
    assert r.summary() == [] and r.stats()["errors"] == 2  # record + ratings


def test_sampling_is_deterministic_per_request_id():
    ids = [f"id-{i}" for i in range(4000)]
    picked = [i for i in ids if sampled(i, 0.25)]
    assert picked == [i for i in ids if sampled(i, 0.25)]
    assert 0.22 < len(picked) / len(ids) < 0.28
    assert all(sampled(i, 1.0) for i in ids[:10]) and not any(sampled(i, 0.0) for i in ids[:10])
    sinks = [FakeSink(), FakeSink()]
    for sink in sinks:  # two replicas see the same requests: the same ones are written
        r = Recorder(args(sample_rate=0.25), sink, start=False)
        for i in range(200):
            r.record(rec(i))
        r.flush_once()
        assert r.stats()["versions"]["m/1"]["generations"] == 200  # aggregates are not sampled
    assert [x.request_id for x in sinks[0].written] == [x.request_id for x in sinks[1].written]
    assert {x.request_id for x in sinks[0].written} == {f"req-{i}" for i in range(200) if sampled(f"req-{i}", 0.25)}


def test_aggregates_are_exact_per_version_with_ratings():
    ratings = {"m": {"2": {"count": 4, "positive": 3, "mean": 0.5}}}
    sink = FakeSink()
    r = Recorder(args(), sink, ratings=lambda: ratings, start=False)
    for i, latency in enumerate([1.0, 2.0, 3.0, 4.0, 100.0]):
        r.record(rec(i, version="2", latency=latency, cached=i == 0))
    r.record(rec(5, version="2", outcome="503", latency=0.1))
    r.record(rec(6, version="2", outcome="400", latency=0.1))
    r.record(rec(7, version="1", outcome="cancelled"))
    rows = {(x["model"], x["version"]): x["metrics"] for x in r.summary()}
    v2 = rows[("m", "2")]
    assert (v2["generations"], v2["ok"], v2["errors"], v2["rejected"]) == (7, 5, 1, 1)
    assert v2["error_rate"] == pytest.approx(1 / 7) and v2["cache_hit_rate"] == pytest.approx(1 / 5)
    assert v2["latency_p50_s"] == 3.0 and v2["latency_p95_s"] == pytest.approx(80.8)  # numpy's linear rule
    assert (v2["ratings"], v2["ratings_positive"], v2["rating_mean"]) == (4, 3, 0.5)
    assert rows[("m", "1")]["cancelled"] == 1 and "rating_mean" not in rows[("m", "1")]
    assert r.summarize() and sink.summaries[0][1] == 1 and r.summarize() and sink.summaries[1][1] == 2


def test_the_writer_thread_writes_records_and_a_summary_every_summary_every_s():
    sink = FakeSink()
    r = Recorder(args(flush_every_s=0.05, summary_every_s=0.2), sink)
    try:
        for i in range(5):
            r.record(rec(i))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(sink.summaries) < 2:
            time.sleep(0.05)
        assert len(sink.written) == 5 and [step for _, step in sink.summaries[:2]] == [1, 2]
        (model, version, figures) = sink.summaries[0][0][0]
        assert (model, version, figures["generations"]) == ("m", "1", 5)
    finally:
        r.close()


def test_helpers():
    assert redact("a cat") == "sha256:" + __import__("hashlib").sha256(b"a cat").hexdigest()[:16] + "/5"
    assert redact("") == ""
    assert [outcome_kind(o) for o in ("ok", "cancelled", "404", "503", "500")] == [
        "ok", "cancelled", "rejected", "error", "error"]  # fmt: skip
    assert percentile([], 0.5) is None and percentile([3.0, 1.0, 2.0], 0.5) == 2.0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the socket is: connections are refused


def test_with_the_mlflow_server_down_recording_returns_at_once_and_drops_are_counted():
    uri = f"http://127.0.0.1:{closed_port()}"
    a = args(buffer_size=20, flush_every_s=0.05, deadline_s=0.5, retry_s=0.3)
    drops: list[int] = []
    r = Recorder(a, MlflowSink(uri, "gens"), on_drop=lambda n, why: drops.append(n))
    try:
        slowest, started = 0.0, time.monotonic()
        for i in range(300):
            t = time.perf_counter()
            r.record(rec(i))
            slowest = max(slowest, time.perf_counter() - t)
            if i % 50 == 0:
                time.sleep(0.2)  # let the writer try (and fail) in between
        total = time.monotonic() - started
        assert slowest < 0.05, f"one record() took {slowest:.3f} s"
        assert total < 2.0  # 300 records + 1.2 s of sleeps
        time.sleep(1.0)
        s = r.stats()
        assert s["written"] == 0 and s["recorded"] == 300
        assert s["buffered"] <= 20 and s["buffered"] + s["dropped_total"] == 300, s
        assert s["dropped"].get("sink_failed", 0) + s["dropped"].get("sink_busy", 0) >= 1, s
        assert sum(drops) == s["dropped_total"] and s["last_error"]
    finally:
        r.close()
    assert r.stats()["dropped_total"] == 300


def test_generator_answers_at_once_with_mlflow_down_and_records_every_request(serve_args, monkeypatch):
    """The real Generator class in-process (no Ray Serve): generate's answers are as fast as without records."""
    from types import SimpleNamespace

    from ray import serve

    from serving.app import Generator
    from serving.engine import ImageRequest

    # outside a replica, what serve.batch asks the replica context (as tests/serving/test_registry_down.py does)
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=32))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)

    uri = f"http://127.0.0.1:{closed_port()}"
    g = Generator.func_or_class(
        serve_args(**{"records.tracking_uri": uri, "records.deadline_s": 0.3, "records.buffer_size": 2})
    )

    async def scenario():
        answers = []
        for i in range(4):
            t = time.monotonic()
            out = await g.generate(ImageRequest(prompt="a red circle", seed=i, n=1, request_id=f"r{i}"))
            answers.append((out, time.monotonic() - t))
        bad = await g.generate(ImageRequest(prompt="x", steps=10_000, request_id="bad"))
        return answers, bad

    try:
        answers, bad = asyncio.run(scenario())
        assert all("images" in out for out, _ in answers) and bad["error"]["status"] == 400
        assert max(s for _, s in answers[1:]) < 5.0  # CPU passes of 4 steps; MLflow's retries would take minutes
        time.sleep(2.0)
        s = g.stats()["records"]
        assert s["recorded"] == 5 and s["written"] == 0 and s["dropped_total"] >= 3, s
        assert s["versions"]["base/-"]["ok"] == 4 and s["versions"]["base/-"]["rejected"] == 1
    finally:
        g.records.close()


@pytest.fixture
def sqlite_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_traces_written_to_mlflow_read_back_by_lorafleet_generations(sqlite_uri, capsys):
    from mlflow import MlflowClient

    from cluster.cli import main

    r = Recorder(args(deadline_s=60, summary_every_s=3600), MlflowSink(sqlite_uri, "gens"), start=False)  # sqlite:
    old = time.time() - 7200  # its first call makes the tables
    for i, latency in enumerate([0.5, 1.0, 1.5, 2.0]):  # version 3: p50 1.25 s
        r.record(rec(i, version="3", latency=latency, cached=i == 3))
    r.record(rec(4, version="3", outcome="503", latency=0.2))
    r.record(rec(5, version="2", latency=9.0, time=old))  # two hours ago
    r.record(rec(6, model="other"))
    r.flush_once()
    assert r.stats()["written"] == 7 and r.stats()["dropped_total"] == 0, r.stats()
    assert r.summarize()

    assert main(["generations", "--model", "m", "--tracking-uri", sqlite_uri, "--experiment", "gens", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["versions"]
    v3 = got["3"]
    assert (v3["requests"], v3["ok"], v3["errors"]) == (5, 4, 1) and v3["error_rate"] == pytest.approx(0.2)
    assert v3["latency_p50_s"] == pytest.approx(1.25) and v3["latency_p95_s"] == pytest.approx(1.925)
    assert v3["cache_hit_rate"] == pytest.approx(0.25)
    assert v3["top_prompts"][0] == ["prompt 0", 2] or v3["top_prompts"][0] == ["prompt 1", 2]
    assert got["2"]["requests"] == 1

    assert (
        main(["generations", "--model", "m", "--since", "1h", "--tracking-uri", sqlite_uri, "--experiment", "gens"])
        == 0
    )
    text = capsys.readouterr().out
    assert "version 3: 5 requests, 4 ok" in text and "version 2" not in text and "p50 1.250s" in text

    # the trace: request in, answer out, the latency as its span's duration, searchable tags
    client = MlflowClient(sqlite_uri)
    eid = client.get_experiment_by_name("gens").experiment_id
    (t,) = client.search_traces(locations=[eid], filter_string="tag.outcome = '503'")
    assert t.info.client_request_id == "req-4" and t.info.tags["tenant"] == "acme"
    (span,) = t.data.spans
    assert span.name == "generation" and span.inputs["prompt"] == "prompt 1" and span.outputs["outcome"] == "503"
    assert (span.end_time_ns - span.start_time_ns) / 1e9 == pytest.approx(0.2)
    # the summary: one run per model version of this replica, metrics at step 1
    runs = client.search_runs([eid], "tags.`lorafleet.kind` = 'production-summary' and tags.`lorafleet.version` = '3'")
    assert len(runs) == 1 and runs[0].data.metrics["generations"] == 5 and runs[0].data.metrics["latency_p50_s"] == 1.25
    assert runs[0].info.status == "RUNNING"
    r.close()  # the replica stops: the last summary (step 2), then its summary runs end FINISHED, not left RUNNING
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "generations")] == [1, 2]


def test_redacted_prompts_are_not_stored_or_listed(sqlite_uri, capsys):
    from cluster.cli import main

    r = Recorder(args(deadline_s=60), MlflowSink(sqlite_uri, "gens"), start=False)
    r.record(rec(0, prompt=redact("a secret prompt")))
    r.flush_once()
    assert main(["generations", "--model", "m", "--tracking-uri", sqlite_uri, "--experiment", "gens"]) == 0
    text = capsys.readouterr().out
    assert "secret" not in text and "prompts: redacted" in text


def test_generations_cli_errors(sqlite_uri, capsys, monkeypatch):
    from cluster.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["generations", "--model", "m"]) == 2
    assert "--tracking-uri" in capsys.readouterr().err
    assert main(["generations", "--model", "m", "--tracking-uri", sqlite_uri, "--since", "yesterday"]) == 2
    assert "--since 'yesterday'" in capsys.readouterr().err
    assert main(["generations", "--model", "m", "--tracking-uri", sqlite_uri]) == 1
    assert "experiment 'lorafleet-generations' does not exist" in capsys.readouterr().err


def test_traces_through_a_tracking_server(mlflow_server, capsys):
    """The replicas' path: an http:// tracking server (spans over OTLP into its database, then the trace info)."""
    from mlflow import MlflowClient

    from cluster.cli import main

    r = Recorder(args(deadline_s=30), MlflowSink(mlflow_server, "gens-http"), start=False)
    for i, latency in enumerate([1.0, 2.0, 3.0]):
        r.record(rec(i, version="7", latency=latency))
    r.flush_once()
    assert r.stats()["written"] == 3 and r.summarize(), r.stats()
    args_ = ["generations", "--model", "m", "--version", "7", "--tracking-uri", mlflow_server, "--experiment"]
    assert main([*args_, "gens-http", "--json"]) == 0
    v7 = json.loads(capsys.readouterr().out)["versions"]["7"]
    assert v7["requests"] == 3 and v7["latency_p50_s"] == pytest.approx(2.0) and v7["error_rate"] == 0
    client = MlflowClient(mlflow_server)
    eid = client.get_experiment_by_name("gens-http").experiment_id
    (t,) = client.search_traces(locations=[eid], filter_string="tag.model = 'm' AND tag.tenant = 'acme'", max_results=1)
    assert t.data.spans and t.data.spans[0].outputs["image_ids"] and t.info.execution_duration in (1000, 2000, 3000)


def test_a_record_is_filed_under_the_registered_model_whatever_name_asked_for_it():
    """``champion``, ``toy-lora/3`` and a canary arm are one registered model: records (and so ``lorafleet
    generations --model toy-lora``, the summaries, /admin/production) file them under it; ``served_as`` keeps the
    name."""
    from types import SimpleNamespace

    from serving.engine import ImageRequest
    from serving.records import generation_record

    adapter = SimpleNamespace(registered="toy-lora", version="3")
    prepared = SimpleNamespace(adapter=adapter, seed=1, steps=4, guidance=4.0, width=64, height=64)
    out = {"model": "champion", "version": "3", "registered_model": "toy-lora", "seeds": [1], "size": "64x64"}
    r = generation_record(ImageRequest(prompt="p", request_id="x"), "champion", prepared, out, "ok", arrived=0.0,
                          latency_s=1.0)  # fmt: skip
    assert (r.model, r.served_as, r.version) == ("toy-lora", "champion", "3")
    folder = generation_record(ImageRequest(prompt="p", request_id="y"), "ad1", None, {"model": "ad1"}, "ok",
                               arrived=0.0, latency_s=1.0)  # fmt: skip
    assert (folder.model, folder.served_as, folder.version) == ("ad1", "ad1", "")
