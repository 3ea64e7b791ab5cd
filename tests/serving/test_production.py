"""The production figures behind ``GET /stats``: replicas' records merged with known answers, ratings and registry
versions joined, the minute buckets and the prompt counts bounded, the route admin-only and the page public."""

from __future__ import annotations

import pytest

from serving.production import Timeline, TopPrompts, report
from serving.records import GenerationRecord, Recorder, RecordsArgs
from tests.serving.test_http import server  # noqa: F401 - the in-process ingress fixture

T0 = 1_800_000_000.0  # a minute boundary (unix s)


def rec(model: str, version: str, latency: float, outcome: str = "ok", t: float = T0, prompt: str = "a red circle",
        cached: bool = False) -> GenerationRecord:  # fmt: skip
    return GenerationRecord(
        time=t, request_id=f"r{t}{latency}{outcome}", tenant="acme", model=model, version=version, prompt=prompt,
        negative_prompt="", seed=1, steps=4, size="64x64", guidance=4.0, n=1, latency_s=latency, queue_wait_s=0.0,
        batch_images=1, outcome=outcome, cached=cached,
    )  # fmt: skip


def replica(pid: int, records: list[GenerationRecord], **args) -> dict:
    """A replica's ``Generator.production()``: a real Recorder (no sink) fed ``records``."""
    recorder = Recorder(RecordsArgs(**args), None, start=False)
    for r in records:
        recorder.record(r)
    return {**recorder.production(), "pid": pid, "uptime_s": 60.0 * pid}


CARDS = [
    {"id": "base", "kind": "base"},
    {"id": "champion", "kind": "adapter", "version": "2"},
    {"id": "toy-lora/1", "kind": "registry", "registered_model": "toy-lora", "version": "1", "aliases": [],
     "status": "rejected"},
    {"id": "toy-lora/2", "kind": "registry", "registered_model": "toy-lora", "version": "2",
     "aliases": ["champion"], "status": "passed"},
]  # fmt: skip


def test_two_replicas_merge_into_known_totals_percentiles_ratings_and_versions():
    a = replica(
        1,
        [rec("champion", "2", s) for s in (1.0, 2.0, 3.0)]
        + [rec("champion", "2", 9.0, "500", t=T0 + 61), rec("champion", "2", 0.1, "400", t=T0 + 61)],
    )
    b = replica(2, [rec("champion", "2", 4.0, t=T0 + 61), rec("champion", "2", 0.0, cached=True, t=T0 + 61),
                    rec("base", "", 5.0, prompt="a blue square")])  # fmt: skip
    ratings = {"champion": {"2": {"count": 4, "positive": 3, "mean": 0.5}},
               "base": {"none": {"count": 1, "positive": 0, "mean": -1.0}}}  # fmt: skip
    out = report([a, b], ratings, CARDS, expected=2)

    assert out["replicas"] == [1, 2] and out["uptime_s"] == 120.0 and out["records"] is True
    t = out["totals"]
    assert (t["requests"], t["ok"], t["errors"], t["rejected"]) == (8, 6, 1, 1)
    assert t["success_rate"] == pytest.approx(6 / 8) and t["error_rate"] == pytest.approx(1 / 8)
    assert t["cache_hit_rate"] == pytest.approx(1 / 6)
    assert t["p50_s"] == pytest.approx(2.5)  # successful latencies 0, 1, 2, 3, 4, 5 over both replicas
    assert (t["ratings"], t["rating_mean"]) == (5, pytest.approx((4 * 0.5 - 1.0) / 5))
    champion = next(v for v in out["versions"] if v["model"] == "champion")
    assert (champion["version"], champion["requests"], champion["errors"], champion["rejected"]) == ("2", 7, 1, 1)
    assert champion["p50_s"] == pytest.approx(2.0) and champion["ratings"]["positive"] == 3
    base = next(v for v in out["versions"] if v["model"] == "base")
    assert base["version"] is None and base["ratings"]["mean"] == -1.0  # records' "" is the feedback's "none"

    first, second = out["timeline"]  # two minute buckets, the replicas' counts added
    assert (first["t"], first["requests"], first["errors"], first["p50_s"]) == (T0, 4, 0, 2.5)  # 1, 2, 3 and 5 s
    assert (first["by_model"], second["by_model"]) == ({"champion": 3, "base": 1}, {"champion": 4})
    assert (second["t"], second["requests"], second["errors"], second["p50_s"]) == (T0 + 60, 4, 1, 2.0)
    assert out["top_prompts"][0] == ["a red circle", 7]
    assert [(v["version"], v["aliases"], v["status"]) for v in out["registry"]] == [
        ("1", [], "rejected"), ("2", ["champion"], "passed"),
    ]  # fmt: skip


def test_redacted_prompts_and_records_off_say_so_and_show_no_text():
    hidden = replica(1, [rec("base", "", 1.0, prompt="sha256:0123456789abcdef/12")], redact_prompts=True)
    out = report([hidden], None, [])
    assert out["top_prompts"] == [] and out["prompts_redacted"] is True and out["ratings_source"] is False
    off = {"enabled": False, "versions": [], "timeline": [], "prompts": [], "redacted": False, "pid": 3}
    out = report([off], None, [])
    assert out["records"] is False and out["totals"]["requests"] == 0 and out["totals"]["success_rate"] is None


def test_minute_buckets_and_prompt_counts_stay_bounded():
    timeline = Timeline(bucket_s=60, buckets=3)
    for minute in range(10):
        timeline.add(T0 + 60 * minute + 5, "base", "ok", 1.0)
    assert [b["t"] for b in timeline.snapshot()] == [T0 + 60 * m for m in (7, 8, 9)]
    prompts = TopPrompts(capacity=3)
    for _ in range(5):
        prompts.add("popular")
    for i in range(100):  # a flood of one-off prompts
        prompts.add(f"once {i}")
    assert len(prompts.counts) == 3 and prompts.top(1) == [("popular", 5)]


def test_the_route_needs_the_admin_key_and_the_page_is_public(server):  # noqa: F811
    snapshot = replica(7, [rec("base", "", 0.5)])
    server.gen.production = lambda: snapshot
    server.gen.models = lambda tenant=None: {"object": "list", "data": CARDS, "registry": None}
    r = server.http.get("/admin/production")
    assert r.status_code == 200, r.text
    assert r.json()["totals"]["requests"] == 1 and r.json()["replicas"] == [7]
    assert server.http.get("/admin/production", headers={"Authorization": "Bearer wrong"}).status_code == 401
    page = server.http.get("/stats", headers={"Authorization": ""})
    assert page.status_code == 200 and "/admin/production" in page.text and "text/html" in page.headers["content-type"]


def test_the_feedback_store_logs_ratings_per_version_next_to_the_production_summaries(tmp_path):
    """The one Feedback replica writes each version's ratings as metrics of a production-summary run (the replicas
    write generations, latency and errors to theirs), so MLflow shows the average rating next to them."""
    from mlflow import MlflowClient

    from serving.config import ServeArgs
    from serving.records import SUMMARY_KIND
    from serving.shared_stores import Feedback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ServeArgs(champion={"model": None}, default_model="base", feedback={"root": str(tmp_path / "fb")},
                     records={"tracking_uri": uri, "summary_every_s": 3600})  # fmt: skip
    store = Feedback.func_or_class(args.feedback.model_dump(), args.model_dump())
    try:
        ids = [f"img_{'a' * 23}{i}" for i in range(3)]
        store.register("acme", "champion", "2", ids)
        for image_id, rating in zip(ids, (1, 1, -1)):
            assert "error" not in store.rate("acme", image_id, rating)
        assert store.summarize_ratings() == 1
        client = MlflowClient(uri)
        (run,) = client.search_runs(
            [client.get_experiment_by_name(args.records.experiment).experiment_id],
            f"tags.`lorafleet.kind` = '{SUMMARY_KIND}'",
        )
        assert (run.data.tags["lorafleet.model"], run.data.tags["lorafleet.version"]) == ("champion", "2")
        assert run.data.metrics == {"ratings": 3.0, "ratings_positive": 2.0, "rating_mean": pytest.approx(1 / 3)}
        store.__del__()  # the replica stops: its last ratings are logged and the run ends FINISHED
        assert client.get_run(run.info.run_id).info.status == "FINISHED"
    finally:
        store.__del__()
