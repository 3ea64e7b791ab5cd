"""Canary promotion (serving/canary.py, serving/canary_cli.py): the statistics on synthetic counts with known answers,
routing by request id, the automatic stop and its registry tag, the HTTP face without Ray, and the CLI on a SQLite
registry. No Ray here."""

from __future__ import annotations

import math
import uuid
from types import SimpleNamespace

import pytest

from serving.canary import (
    CHALLENGER,
    CHAMPION,
    TAG_STOPPED,
    BadRequestId,
    Canary,
    Route,
    arm_for,
    client_request_id,
    compare_rates,
    decide,
    fraction,
    p95,
    report,
    wilson_interval,
    z_value,
)
from serving.config import ServeArgs
from serving.feedback_routes import FeedbackRoutes
from tests.serving import test_http

server = test_http.server  # the ingress under Starlette's TestClient, with a fake generator
Z95 = z_value(0.95)


def canary_args(**canary) -> ServeArgs:
    return ServeArgs(
        champion={"model": "toy-canary", "poll_s": 0},
        canary={"share": 0.1, **canary},
        api_key_env="LORAFLEET_UNSET_KEY",
    )


def adapter(version: str | None):
    return SimpleNamespace(version=version)


# ---- statistics with known answers -------------------------------------------------------------------------------
def test_wilson_interval_matches_published_values():
    # 5/10 and 0/10 at 95 %: Brown, Cai & DasGupta (2001) / statsmodels proportion_confint(method="wilson")
    lo, hi = wilson_interval(5, 10, Z95)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson_interval(0, 10, Z95)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    lo, hi = wilson_interval(81, 263, Z95)  # Wilson's interval for 81/263 (Newcombe 1998, Table I): 0.2553-0.3662
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson_interval(0, 0, Z95) is None
    with pytest.raises(ValueError, match="outside"):
        wilson_interval(11, 10, Z95)
    assert round(Z95, 4) == 1.96 and round(z_value(0.99), 4) == 2.5758


def test_p95_interpolates_like_numpy():
    np = pytest.importorskip("numpy")
    xs = [0.1 * i for i in range(1, 38)]
    assert math.isclose(p95(xs), float(np.percentile(xs, 95)))
    assert p95([]) is None and p95([2.0]) == 2.0


def arms(requests=1000, errors=(5, 5), latency=(1.0, 1.0)):
    return {
        CHAMPION: {"requests": requests, "errors": errors[0], "latency_s": [latency[0]] * 200},
        CHALLENGER: {"requests": requests, "errors": errors[1], "latency_s": [latency[1]] * 200},
    }


def ratings(champion: tuple[int, int], challenger: tuple[int, int]):
    return {
        CHAMPION: {"positive": champion[0], "count": champion[1]},
        CHALLENGER: {"positive": challenger[0], "count": challenger[1]},
    }


def test_decide_clearly_better_clearly_worse_too_few_and_equal():
    cfg = canary_args().canary
    better = decide(arms(), ratings((300, 1000), (450, 1000)), cfg)
    assert better["verdict"] == "better" and better["ratings"]["outcome"] == "better"
    worse = decide(arms(), ratings((450, 1000), (300, 1000)), cfg)
    assert worse["verdict"] == "worse" and "positive-rating" in worse["reasons"][0]
    few = decide(arms(), ratings((3, 10), (9, 10)), cfg)  # 90 % vs 30 % but 10 ratings < decision.min_ratings
    assert few["verdict"] == "undecided" and few["ratings"]["outcome"] == "too_few"
    equal = decide(arms(), ratings((400, 1000), (400, 1000)), cfg)
    assert equal["verdict"] == "undecided" and equal["ratings"]["outcome"] == "undecided"
    # a small difference stays undecided: 40 % vs 42 % of 1000 overlaps at 95 %
    assert decide(arms(), ratings((400, 1000), (420, 1000)), cfg)["verdict"] == "undecided"


def test_decide_errors_and_latency_can_only_make_it_worse():
    cfg = canary_args().canary
    good_ratings = ratings((300, 1000), (450, 1000))
    errs = decide(arms(errors=(5, 60)), good_ratings, cfg)  # 0.5 % vs 6 % 5xx
    assert errs["verdict"] == "worse" and errs["errors"]["outcome"] == "worse"
    slow = decide(arms(latency=(1.0, 1.3)), good_ratings, cfg)  # p95 +30 % > tolerance 20 %
    assert slow["verdict"] == "worse" and slow["latency"]["outcome"] == "worse"
    assert decide(arms(latency=(1.0, 1.15)), good_ratings, cfg)["verdict"] == "better"  # +15 %: within tolerance
    fewer_errors = decide(arms(errors=(60, 5)), None, cfg)  # no ratings source: never "better"
    assert fewer_errors["verdict"] == "undecided" and fewer_errors["errors"]["outcome"] == "better"
    assert decide(arms(requests=50, errors=(0, 30)), None, cfg)["errors"]["outcome"] == "too_few"
    # better ratings but too few requests to judge errors: not yet better
    assert decide(arms(requests=50), good_ratings, cfg)["verdict"] == "undecided"


def test_compare_rates_is_symmetric():
    a = compare_rates((30, 100), (60, 100), higher_is_better=True, z=Z95, min_samples=10)
    b = compare_rates((60, 100), (30, 100), higher_is_better=True, z=Z95, min_samples=10)
    assert (a["outcome"], b["outcome"]) == ("better", "worse")


# ---- routing ------------------------------------------------------------------------------------------------------
def test_the_same_request_id_lands_on_the_same_arm_and_the_share_holds():
    ids = [uuid.UUID(int=i).hex for i in range(10_000)]
    assert [arm_for(i, 0.1) for i in ids] == [arm_for(i, 0.1) for i in ids]  # deterministic
    hits = sum(arm_for(i, 0.1) == CHALLENGER for i in ids)
    bound = 4 * math.sqrt(10_000 * 0.1 * 0.9)  # 4 binomial standard deviations: 120
    assert abs(hits - 1000) < bound
    assert all(arm_for(i, 0.0) == CHAMPION for i in ids[:1000])
    assert all(arm_for(i, 1.0) == CHALLENGER for i in ids[:1000])
    assert all(0 <= fraction(i) < 1 for i in ids[:1000])
    # a larger share keeps every id the smaller one sent to the challenger (raising the share moves no one back)
    assert {i for i in ids if arm_for(i, 0.05) == CHALLENGER} <= {i for i in ids if arm_for(i, 0.1) == CHALLENGER}


def synced(c: Canary) -> Canary:
    """As after a registry read that answered (``Canary.sync``)."""
    c.synced = True
    return c


def key_for(arm: str, share: float = 0.1) -> str:
    return next(k for k in (f"req-{i}" for i in range(1000)) if arm_for(k, share) == arm)


def test_champion_requests_are_routed_and_explicit_versions_never():
    c = synced(Canary(canary_args()))
    known = {"champion": adapter("3"), "toy-canary@challenger": adapter("4")}
    to_challenger, to_champion = key_for(CHALLENGER), key_for(CHAMPION)
    for asked in ("champion", "toy-canary", "toy-canary@champion"):  # every name that means the champion
        assert c.pick(asked, to_challenger, known) == Route(CHALLENGER, "toy-canary@challenger", "4")
        assert c.pick(asked, to_champion, known).arm == CHAMPION
    assert c.pick("champion", to_champion, known) == Route(CHAMPION, "champion", "3")
    for asked in ("toy-canary/3", "toy-canary@previous", "toy-canary@challenger", "base", "other"):
        assert c.pick(asked, to_challenger, known) is None  # never re-routed, not counted


def test_the_share_is_zero_until_it_is_safe():
    args = canary_args()
    known = {"champion": adapter("3"), "toy-canary@challenger": adapter("4")}
    key = key_for(CHALLENGER)
    assert Canary(args).pick("champion", key, known).arm == CHAMPION  # no registry read yet
    c = synced(Canary(args))
    assert c.pick("champion", key, {"champion": adapter("3")}).arm == CHAMPION  # challenger not resolved yet
    assert c.pick("champion", key, {**known, "toy-canary@challenger": adapter("3")}).arm == CHAMPION  # same version
    c.unsynced("ConnectionError: refused")  # the registry went away: another replica's stop could not be seen
    assert c.pick("champion", key, known).arm == CHAMPION and c.state()["registry_sync_error"]
    assert synced(Canary(canary_args(share=0.0))).pick("champion", key, known) is None  # no canary: not counted


# ---- the automatic stop -------------------------------------------------------------------------------------------
def test_an_error_spike_stops_the_challenger_at_once():
    c = synced(Canary(canary_args(rollback={"window": 50, "min_requests": 20, "max_error_rate": 0.2, "margin": 0.1})))
    champ, chall = Route(CHAMPION, "champion", "3"), Route(CHALLENGER, "toy-canary@challenger", "4")
    for _ in range(30):
        assert c.record(champ, "ok", 0.5) is None
    stops = [c.record(chall, "500" if i % 2 else "ok", 0.6) for i in range(19)]
    assert not any(stops)  # 19 < min_requests
    reason = c.record(chall, "503", 0.6)  # the 20th: 10/20 = 50 % > 20 % and > 0 % + 10 %
    assert reason and "version 4" in reason and "50%" in reason
    assert c.share("3", "4") == 0.0 and c.state()["unsaved_stops"] == ["4"]
    assert c.record(chall, "500", 0.6) is None  # stopped once
    row = next(r for r in c.snapshot()["counts"] if r["arm"] == CHALLENGER)
    assert (row["requests"], row["errors"], len(row["latency_s"])) == (21, 11, 10)


def test_no_stop_when_the_champion_fails_as_often_or_errors_are_the_clients():
    c = synced(Canary(canary_args()))
    champ, chall = Route(CHAMPION, "champion", "3"), Route(CHALLENGER, "toy-canary@challenger", "4")
    for i in range(40):
        c.record(champ, "500" if i % 3 == 0 else "ok", 0.5)  # 34 % 5xx: the cluster is ill, not the challenger
        assert c.record(chall, "500" if i % 3 == 0 else "ok", 0.5) is None
    c2 = synced(Canary(canary_args()))
    for _ in range(40):
        assert c2.record(chall, "400", 0.1) is None and c2.record(chall, "cancelled", 0.1) is None
    assert c2.share("3", "4") == 0.1


class FakeRegistryClient:
    """The few MlflowClient calls ``Canary.sync`` makes, on dicts; ``down`` makes every call fail like a refused
    connection."""

    def __init__(self, alias_to: str | None):
        self.alias_to, self.tags, self.down = alias_to, {}, False

    def _check(self):
        if self.down == "mlflow":  # what MlflowClient raises once its HTTP retries ran out
            from mlflow.exceptions import MlflowException

            raise MlflowException("API request failed with exception HTTPConnectionPool")  # INTERNAL_ERROR
        if self.down:
            raise ConnectionError("registry refused the connection")

    def set_model_version_tag(self, name, version, key, value):
        self._check()
        self.tags.setdefault(str(version), {})[key] = value

    def get_model_version_by_alias(self, name, alias):
        self._check()
        if self.alias_to is None:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException("Registered model alias challenger not found.", INVALID_PARAMETER_VALUE)
        return SimpleNamespace(version=self.alias_to, tags=dict(self.tags.get(self.alias_to, {})))


def test_a_stop_is_recorded_in_the_registry_and_other_replicas_honour_it():
    registry = FakeRegistryClient("4")
    one, two = synced(Canary(canary_args())), Canary(canary_args())
    chall = Route(CHALLENGER, "toy-canary@challenger", "4")
    registry.down = True
    for _ in range(20):
        one.record(chall, "500", 1.0)
    with pytest.raises(ConnectionError):
        one.sync(registry)  # the registry is down: the stop waits, the share is 0 here anyway
    assert one.share("3", "4") == 0.0 and one.state()["unsaved_stops"] == ["4"]
    registry.down = False
    one.sync(registry)  # the next poll writes it
    assert TAG_STOPPED in registry.tags["4"] and one.state()["unsaved_stops"] == []
    two.sync(registry)  # another replica (or a restarted one) on its next poll
    assert two.share("3", "4") == 0.0 and "5xx rate" in two.state()["stopped"]["4"]
    registry.tags["4"].pop(TAG_STOPPED)  # `lorafleet promote toy-canary 4 --challenger` again: starts clean
    two.sync(registry)
    assert two.share("3", "4") == 0.1 and two.state()["stopped"] == {}
    registry.down = "mlflow"  # an outage is not "no challenger": the share drops to 0 until the registry answers
    with pytest.raises(Exception, match="API request failed"):
        two.sync(registry)
    assert two.share("3", "4") == 0.0 and "API request failed" in two.state()["registry_sync_error"]
    registry.down, registry.alias_to = False, None  # the alias was removed (`lorafleet canary promote`)
    two.sync(registry)
    assert two.state()["challenger_version"] is None and two.state()["registry_synced"]


def test_report_merges_replicas_and_attaches_ratings():
    args = canary_args()
    snaps = []
    for pid, (ok_champ, err_chall) in ((11, (60, 1)), (12, (50, 2))):
        c = synced(Canary(args))
        c.registry_challenger = "4"
        for _ in range(ok_champ):
            c.record(Route(CHAMPION, "champion", "3"), "ok", 0.5)
        for i in range(10):
            c.record(Route(CHALLENGER, "toy-canary@challenger", "4"), "500" if i < err_chall else "ok", 0.7)
        known = {"champion": adapter("3"), "toy-canary@challenger": adapter("4")}
        snaps.append({"pid": pid, **c.snapshot(known)})
    summary = {"champion": {"3": {"count": 40, "positive": 12, "mean": 0.3}, "4": {"count": 50, "positive": 40,
               "mean": 0.8}}, "toy-canary": {"3": {"count": 60, "positive": 18, "mean": 0.3}}}  # fmt: skip
    out = report(snaps, summary, args, replicas_expected=2)
    champ, chall = out["arms"][CHAMPION], out["arms"][CHALLENGER]
    assert (champ["version"], champ["requests"], champ["errors"]) == ("3", 110, 0)
    assert (chall["version"], chall["requests"], chall["errors"]) == ("4", 20, 3)
    assert champ["ratings"] == {"count": 100, "positive": 30, "mean": pytest.approx(0.3)}  # both names summed
    assert chall["ratings"]["positive"] == 40 and out["replicas"] == [11, 12]
    assert out["verdict"] in ("better", "worse", "undecided") and out["ratings_source"] is True
    assert out["share_now"] == 0.1 and chall["latency_p95_s"] == pytest.approx(0.7)
    assert report(snaps, None, args)["ratings_source"] is False


# ---- request ids ----------------------------------------------------------------------------------------------------
def test_client_request_ids_are_validated():
    assert client_request_id({}) is None
    assert client_request_id({"X-Request-Id": ["abc-1"]}) == "abc-1"
    assert client_request_id({"X-Request-Id": ["dGVzdA+/="]}) == "dGVzdA+/="  # base64 ids that proxies forward
    assert client_request_id({"Idempotency-Key": ["k:2"]}) == "k:2"
    assert client_request_id({"X-Request-Id": ["same"], "Idempotency-Key": ["same"]}) == "same"
    for headers, name in (
        ({"X-Request-Id": ["a b"]}, "X-Request-Id"),
        ({"X-Request-Id": ["x" * 129]}, "X-Request-Id"),
        ({"Idempotency-Key": ["a", "b"]}, "Idempotency-Key"),
        ({"X-Request-Id": ["a"], "Idempotency-Key": ["b"]}, "X-Request-Id"),
    ):
        with pytest.raises(BadRequestId) as err:
            client_request_id(headers)
        assert err.value.header == name


# ---- the HTTP face, without Ray (tests/serving/test_http.py's ingress under Starlette's TestClient) ---------------
@pytest.fixture
def http(server, monkeypatch):
    """The ingress of ``test_http.server`` with a generator that answers as a canary replica: its arm by the request's
    routing key (share 0.5), and ``canary_state`` from a ``Canary`` that counted a few requests."""
    from ray import serve

    gen, args = server.gen, canary_args(share=0.5)
    state = synced(Canary(args))
    state.registry_challenger = "4"
    for i in range(30):
        state.record(Route(CHAMPION, "champion", "3"), "ok", 0.2)
        state.record(Route(CHALLENGER, "toy-canary@challenger", "4"), "ok" if i % 10 else "500", 0.3)
    plain = gen.generate

    async def generate(req, epoch: int = 0) -> dict:
        out = await plain(req, epoch)
        arm = arm_for(req.routing_key, 0.5)
        return out | {"arm": arm, "version": "4" if arm == CHALLENGER else "3"}

    monkeypatch.setattr(gen, "generate", generate, raising=False)
    known = {"champion": adapter("3"), "toy-canary@challenger": adapter("4")}
    monkeypatch.setattr(gen, "canary_state", lambda: {"pid": 7, **state.snapshot(known)}, raising=False)
    api = serve.get_replica_context().servable_object
    api.args = api.args.model_copy(update={"champion": args.champion, "canary": args.canary})
    return SimpleNamespace(http=server.http, gen=gen, api=api)


def test_a_client_request_id_picks_the_arm_and_the_answer_says_which(http):
    key = key_for(CHALLENGER, 0.5)
    for _ in range(2):  # a retry with the same id: the same arm
        r = http.http.post("/v1/images/generations", json={"prompt": "a red circle"}, headers={"X-Request-Id": key})
        assert r.status_code == 200 and r.json()["arm"] == CHALLENGER and r.json()["version"] == "4"
        assert http.gen.requests[-1].client_request_id == key and http.gen.requests[-1].routing_key == key
    other = key_for(CHAMPION, 0.5)
    r = http.http.get("/v1/generate", params={"prompt": "a red circle"}, headers={"Idempotency-Key": other})
    assert r.status_code == 200 and r.headers["X-Lorafleet-Arm"] == CHAMPION and r.headers["X-Version"] == "3"
    r = http.http.post("/v1/images/generations", json={"prompt": "x"}, headers={"X-Request-Id": "no spaces please"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"
    r = http.http.post("/v1/images/generations", json={"prompt": "x"})  # no id: the request's own random one
    assert r.status_code == 200 and http.gen.requests[-1].client_request_id is None


def test_admin_canary_reports_the_arms_with_ratings(http):
    r = http.http.get("/admin/canary")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "toy-canary" and body["replicas"] == [7] and body["ratings_source"] is False
    assert (body["arms"][CHAMPION]["requests"], body["arms"][CHALLENGER]["errors"]) == (30, 3)
    assert body["verdict"] == "undecided" and "Wilson" in body["test"]
    ratings = {"champion": {"3": {"count": 200, "positive": 60, "mean": 0.3},
                            "4": {"count": 200, "positive": 150, "mean": 0.75}}}  # fmt: skip
    store = SimpleNamespace(summary=lambda: ratings)  # the Feedback deployment's summary (serving/feedback.py)
    http.api.feedback = FeedbackRoutes(http.api.args.feedback, test_http.Remote(store), 1)
    body = http.http.get("/admin/canary").json()
    assert body["ratings"]["outcome"] == "better" and body["arms"][CHALLENGER]["ratings"]["count"] == 200
    assert body["verdict"] == "undecided"  # better ratings, but 30 requests < decision.min_requests (100)
    assert any("min_requests" in why for why in body["reasons"])
