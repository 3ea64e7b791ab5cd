"""Canary promotion against a real MLflow registry (SQLite): `lorafleet promote --challenger` with the gate's checks,
`lorafleet canary status|promote` on a synthetic /admin/canary report, the stop tag through MlflowClient, and an
engine that follows the challenger alias next to the champion. No Ray."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from serving.canary import CHALLENGER, CHAMPION, TAG_STOPPED, Canary, Route, report
from serving.canary import arm_for as arm_of
from tests.serving.conftest import register_adapter

NAME = "toy-canary"


@pytest.fixture
def registry(tmp_path, tiny_adapters):
    """A SQLite registry with version 1 the champion, 2 passed the gate, 3 rejected by it: (uri, client)."""
    from evaluation.registry import client_for

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert register_adapter(uri, NAME, tiny_adapters["ad0"], status="passed") == "1"
    assert register_adapter(uri, NAME, tiny_adapters["ad1"], alias=None, status="passed") == "2"
    assert register_adapter(uri, NAME, tiny_adapters["ad2"], alias=None, status="rejected") == "3"
    return uri, client_for(uri)


def aliases(client) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()}


def synthetic_report(args, positive: tuple[int, int], requests: int = 200, errors: tuple[int, int] = (0, 0)) -> dict:
    """``GET /admin/canary``'s body for champion 1 / challenger 2 with these counts and 200 ratings per arm."""
    c = Canary(args)
    c.synced, c.registry_challenger = True, "2"
    for arm, version, errs in ((CHAMPION, "1", errors[0]), (CHALLENGER, "2", errors[1])):
        for i in range(requests):
            c.record(Route(arm, "x", version), "500" if i < errs else "ok", 0.5)
    summary = {"champion": {"1": {"count": 200, "positive": positive[0], "mean": None},
                            "2": {"count": 200, "positive": positive[1], "mean": None}}}  # fmt: skip
    known = {"champion": SimpleNamespace(version="1"), f"{NAME}@challenger": SimpleNamespace(version="2")}
    return report([{"pid": 1, **c.snapshot(known)}], summary, args, 1)


def serve_args(uri: str):
    from serving.config import ServeArgs

    return ServeArgs(champion={"model": NAME}, canary={"share": 0.2}, tracking_uri=uri, api_key_env="LORAFLEET_UNSET")


def test_promote_challenger_with_the_gate_checks_then_canary_promote(registry, monkeypatch, capsys):
    from cluster.cli import main
    from serving import canary_cli

    uri, client = registry
    assert main(["promote", NAME, "3", "--challenger", "--tracking-uri", uri]) == 1  # the gate rejected it
    assert "rejected by the gate" in capsys.readouterr().err
    assert main(["promote", NAME, "1", "--challenger", "--tracking-uri", uri]) == 1  # the champion itself
    assert "is the champion already" in capsys.readouterr().err
    assert main(["promote", NAME, "2", "--challenger", "--tracking-uri", uri]) == 0
    assert aliases(client) == {"champion": "1", CHALLENGER: "2"}  # champion and previous untouched

    args = serve_args(uri)
    given = {"report": synthetic_report(args, positive=(80, 80))}  # equal ratings: undecided
    monkeypatch.setattr(canary_cli, "fetch_report", lambda url, key, timeout_s=10.0: given["report"])
    assert main(["canary", "status", NAME, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "registry: champion 1, challenger 2 (gate: passed)" in out and "verdict: undecided" in out
    assert "challenger        2       200" in out and "stopped: no" in out
    assert main(["canary", "promote", NAME, "--tracking-uri", uri]) == 1
    assert "the verdict is 'undecided'" in capsys.readouterr().err and aliases(client)["champion"] == "1"

    given["report"] = synthetic_report(args, positive=(60, 150))  # 30 % vs 75 % positive, 200 each: better
    assert main(["canary", "status", NAME, "--tracking-uri", uri, "--json"]) == 0
    assert '"verdict": "better"' in capsys.readouterr().out
    client.set_model_version_tag(NAME, "2", TAG_STOPPED, "5xx rate 50% (at 2026-12-01T10:00:00Z)")
    assert main(["canary", "promote", NAME, "--tracking-uri", uri]) == 1  # a stopped canary needs --force
    assert "its canary was stopped: 5xx rate 50%" in capsys.readouterr().err
    assert main(["promote", NAME, "2", "--challenger", "--tracking-uri", uri]) == 0  # a new try starts clean
    assert TAG_STOPPED not in client.get_model_version(NAME, "2").tags
    assert main(["canary", "promote", NAME, "--tracking-uri", uri]) == 0
    assert "champion -> version 2 (was 1, now previous)" in capsys.readouterr().out
    assert aliases(client) == {"champion": "2", "previous": "1"}  # the challenger alias is gone
    assert main(["rollback", NAME, "--tracking-uri", uri]) == 0  # rollback undoes it as any promotion
    assert aliases(client)["champion"] == "1"


def test_canary_promote_refuses_a_report_for_another_challenger_and_force_skips_the_server(registry, monkeypatch,
                                                                                            capsys):  # fmt: skip
    from cluster.cli import main
    from serving import canary_cli

    uri, client = registry
    assert main(["promote", NAME, "2", "--challenger", "--tracking-uri", uri]) == 0
    stale = synthetic_report(serve_args(uri), positive=(60, 150))
    stale["arms"][CHALLENGER]["version"] = "3"  # the server has not polled since the alias moved
    monkeypatch.setattr(canary_cli, "fetch_report", lambda url, key, timeout_s=10.0: stale)
    assert main(["canary", "promote", NAME, "--tracking-uri", uri]) == 1
    assert "wait for its poll" in capsys.readouterr().err

    def unreachable(url, key, timeout_s=10.0):
        raise RuntimeError(f"the Serve app at {url} did not answer")

    monkeypatch.setattr(canary_cli, "fetch_report", unreachable)
    assert main(["canary", "status", NAME, "--tracking-uri", uri]) == 1  # the registry part is still printed
    captured = capsys.readouterr()
    assert "challenger 2" in captured.out and "did not answer" in captured.err
    assert main(["canary", "promote", NAME, "--tracking-uri", uri, "--force"]) == 0
    assert aliases(client) == {"champion": "2", "previous": "1"}


def test_stops_travel_through_mlflow_between_replicas(registry):
    from evaluation.registry import set_challenger

    uri, client = registry
    set_challenger(client, NAME, "2")
    args = serve_args(uri)
    one, two = Canary(args), Canary(args)
    one.sync(client)
    assert one.share("1", "2") == 0.2 and one.state()["challenger_version"] == "2"
    for _ in range(args.canary.rollback.min_requests):
        one.record(Route(CHALLENGER, f"{NAME}@challenger", "2"), "500", 1.0)
    assert one.share("1", "2") == 0.0
    one.sync(client)  # what the Generator does at once (and on every poll until it is written)
    assert "5xx rate 100%" in client.get_model_version(NAME, "2").tags[TAG_STOPPED]
    two.sync(client)  # another replica's poll; a restarted replica reads the same
    assert two.share("1", "2") == 0.0 and "5xx rate" in two.state()["stopped"]["2"]
    set_challenger(client, NAME, "2")  # promoted again: clean
    two.sync(client)
    assert two.share("1", "2") == 0.2


def test_an_engine_follows_the_challenger_and_serves_its_version(registry, serve_args):
    """The challenger is one more followed name: resolved by the replica's refresh (and preloaded), drawn with its own
    version when the canary picks it; the champion's requests without the pick stay on the champion."""
    from evaluation.registry import set_challenger
    from serving.engine import Engine, ImageRequest

    uri, client = registry
    set_challenger(client, NAME, "2")
    args = serve_args(**{"champion.model": NAME, "tracking_uri": uri, "canary.share": 0.5, "champion.poll_s": 0})
    engine = Engine.from_args(args)
    assert engine.resolver.refresh() == {"champion": "1", f"{NAME}@challenger": "2"}
    engine.preload([f"{NAME}@challenger"])  # the Generator's poll does this before the canary may pick it
    assert engine.stats()["loaded"] == 1
    canary = Canary(args)
    canary.sync(client)
    picks = {canary.pick("champion", f"id-{i}", engine.resolver.known()) for i in range(40)}
    assert {p.arm for p in picks} == {CHAMPION, CHALLENGER}
    challenger = next(p for p in picks if p.arm == CHALLENGER)
    prepared = engine.prepare(ImageRequest("a red circle", model=challenger.name, steps=2, seed=1))
    [result] = engine.generate([prepared])
    assert result.version == "2" == challenger.version
    [champ] = engine.generate([engine.prepare(ImageRequest("a red circle", model="champion", steps=2, seed=1))])
    assert champ.version == "1"
    # the alias cleared (canary promote, or by hand): no error, no arm — every champion request stays the champion's
    client.delete_registered_model_alias(NAME, "challenger")
    assert engine.resolver.refresh() == {"champion": "1", f"{NAME}@challenger": "none: no challenger alias"}
    picks = {canary.pick("champion", f"id-{i}", engine.resolver.known()) for i in range(40)}
    assert {p.arm for p in picks if p is not None} <= {CHAMPION}
    engine.resolver.close()


@pytest.mark.slow
def test_the_replica_routes_counts_and_stops_the_challenger_end_to_end(registry, serve_args, monkeypatch):
    """The real Generator deployment class behind the real ingress, in process (as tests/serving/test_registry_down.py
    runs them): champion requests split by X-Request-Id, answers naming the arm, an explicit version never re-routed;
    then the challenger's passes fail (injected), its share drops to 0 at once and the stop is in the registry."""
    import asyncio

    from evaluation.registry import set_challenger
    from serving.engine import ImageResult
    from tests.serving.test_registry_down import serving

    uri, client = registry
    set_challenger(client, NAME, "2")
    args = serve_args(**{"champion.model": NAME, "tracking_uri": uri, "canary.share": 0.5, "champion.poll_s": 0,
                         "default_model": "champion", "defaults.steps": 2, "warmup": False,
                         "canary.rollback.min_requests": 5, "canary.rollback.window": 10,
                         "response_cache.enabled": False})  # fmt: skip  # repeats must reach the (failing) passes
    to_challenger = [f"r{i}" for i in range(200) if arm_of(f"r{i}", 0.5) == CHALLENGER][:8]
    to_champion = next(f"r{i}" for i in range(200) if arm_of(f"r{i}", 0.5) == CHAMPION)

    async def scenario():
        async with serving(args, monkeypatch) as s:
            assert s.gen.engine.stats()["loaded"] == 1  # the challenger was preloaded at start
            r = await s.http.get("/v1/generate", params={"prompt": "a red circle", "seed": 1},
                                 headers={"X-Request-Id": to_challenger[0]})  # fmt: skip
            assert r.status_code == 200 and r.headers["X-Lorafleet-Arm"] == CHALLENGER, r.text
            assert (r.headers["X-Version"], r.headers["X-Model"]) == ("2", "champion")
            for _ in range(2):  # a retry with the same id lands on the same arm
                body = {"prompt": "a red circle", "model": NAME, "seed": 1}
                r = await s.http.post("/v1/images/generations", json=body, headers={"X-Request-Id": to_champion})
                assert (r.json()["arm"], r.json()["version"], r.json()["model"]) == (CHAMPION, "1", NAME)
            body = {"prompt": "a red circle", "model": f"{NAME}/1", "seed": 1}
            r = await s.http.post("/v1/images/generations", json=body, headers={"X-Request-Id": to_challenger[0]})
            assert r.json()["arm"] is None and r.json()["version"] == "1"  # pinned: never re-routed

            plain = s.gen.engine.generate

            def failing(batch, should_stop=None):  # the challenger's passes fail: injected errors
                out = plain(batch, should_stop)
                return [RuntimeError("injected") if isinstance(o, ImageResult) and o.version == "2" else o
                        for o in out]  # fmt: skip

            s.gen.engine.generate = failing
            statuses = []
            for key in to_challenger[1:7]:
                r = await s.http.get("/v1/generate", params={"prompt": "a red circle", "seed": 1},
                                     headers={"X-Request-Id": key})  # fmt: skip
                statuses.append((r.status_code, r.headers.get("X-Lorafleet-Arm")))
            # 1 ok + 4 failed = rollback.min_requests (5) at 80 % 5xx: the share drops to 0 at once, in this replica
            assert statuses == [(500, None)] * 4 + [(200, CHAMPION)] * 2
            rep = (await s.http.get("/admin/canary")).json()
            assert rep["share_now"] == 0.0 and "5xx rate 80%" in rep["stopped"]
            assert (rep["arms"][CHALLENGER]["requests"], rep["arms"][CHALLENGER]["errors"]) == (5, 4)
            s.gen._bg.submit(lambda: None).result()  # the stop's registry write has run
            assert "5xx rate" in client.get_model_version(NAME, "2").tags[TAG_STOPPED]

    asyncio.run(scenario())


def test_the_evaluation_sets_the_challenger_when_configured(registry):
    """``registry.promote_to: challenger`` (the pipeline's switch): a passing adapter gets the challenger alias and the
    champion stays; with the default it becomes the champion."""
    from evaluation.config import RegistryArgs
    from evaluation.evaluate import register_result

    uri, client = registry
    exp = client.get_experiment_by_name("serving-tests").experiment_id
    adapter = {"sha256": "ab" * 32, "base_model": "models/toy-sd"}
    result = SimpleNamespace(adapter=adapter, metrics={"clip_score": 0.3}, passed=True,
                             gate=SimpleNamespace(summary=lambda: "passed"))  # fmt: skip

    def cfg(promote_to: str):
        return SimpleNamespace(
            registry=RegistryArgs(model_name=NAME, promote_to=promote_to),
            comparable_key=lambda: "k",
            suite=SimpleNamespace(trigger="sks"),
        )

    champion = {"version": "1", "sha256": "x"}
    info = register_result(cfg("challenger"), client, client.create_run(exp).info.run_id, result, champion)
    assert info["alias"] == CHALLENGER and aliases(client) == {"champion": "1", CHALLENGER: info["version"]}
    info = register_result(cfg("champion"), client, client.create_run(exp).info.run_id, result, champion)
    assert info["alias"] == "champion" and aliases(client)["champion"] == info["version"]


def test_a_challenger_with_the_champions_very_weights_is_refused(registry, tiny_adapters, capsys):
    """An import of the champion's adapter under a new version (same adapter_sha256): a canary would compare the
    champion with itself."""
    from cluster.cli import main

    uri, client = registry
    assert register_adapter(uri, NAME, tiny_adapters["ad0"], alias=None, status="passed") == "4"  # v1's weights
    assert main(["promote", NAME, "4", "--challenger", "--tracking-uri", uri]) == 1
    assert "holds the same weights as the champion (version 1" in capsys.readouterr().err
    assert CHALLENGER not in aliases(client)
