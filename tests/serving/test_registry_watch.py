"""The registry watch and resolver's edge cases (a review of the registry-down work found them): a slow call while
the registry answers others does not mark it down; a download error the registry answered (missing artifacts) is an
answer, not an outage; requests waiting on one look-up all get its answer; an old answer is looked up again; the
registry's address is shown without credentials and public views carry no address, errors or references. In
process, with the resolver's fetch replaced by a scripted one (no MLflow server)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.registry_watch import RegistryTimeout, RegistryWatch, reached_registry, shown_uri


def test_a_slow_call_does_not_mark_an_answering_registry_down():
    watch = RegistryWatch("http://127.0.0.1:5000", deadline_s=0.2, retry_s=5)
    release = threading.Event()
    try:
        slow = watch.submit(release.wait, 30)  # a large download
        watch.call(lambda: "listing", deadline_s=5)  # meanwhile the registry answers another call
        with pytest.raises(RegistryTimeout):
            watch.wait(slow)
        assert not watch.down() and watch.may_retry()
        release.set()
        slow.result(timeout=10)  # the download ends
        hang = threading.Event()
        hung = watch.submit(hang.wait, 30)  # nothing answers while this one waits: now it counts
        with pytest.raises(RegistryTimeout):
            watch.wait(hung)
        assert watch.down()
        hang.set()
    finally:
        release.set()
        watch.close()


def test_a_download_error_the_registry_answered_is_not_an_outage():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from evaluation.registry import RegistryError

    def wrapped(cause: BaseException) -> RegistryError:
        try:
            raise RegistryError("downloading toy-sks-lora/1 failed") from cause
        except RegistryError as exc:
            return exc

    missing = MlflowException("artifact not found", error_code=RESOURCE_DOES_NOT_EXIST)
    assert reached_registry(wrapped(missing)) is True
    assert reached_registry(wrapped(ConnectionRefusedError("refused"))) is False
    assert reached_registry(RegistryError("no tracking URI")) is False


def test_the_registry_address_is_shown_without_credentials():
    assert shown_uri("https://alice:s3cret@mlflow.internal:5000/x") == "https://mlflow.internal:5000/x"
    assert shown_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert RegistryWatch("http://u:p@h:1", 1, 1).uri == "http://h:1"


@pytest.fixture
def resolver(tiny_pipe_dir, tmp_path):
    from serving.adapters import AdapterResolver
    from tests.serving.conftest import tiny_serve_args

    args = tiny_serve_args(tiny_pipe_dir, {}, tmp_path / "cache", tracking_uri="http://u:p@127.0.0.1:9",
                           registry_deadline_s=5, registry_retry_s=0.5)  # fmt: skip
    r = AdapterResolver(args, str(tiny_pipe_dir), tmp_path / "cache")
    yield r
    r.close()


def test_every_request_waiting_on_one_look_up_gets_its_answer(resolver):
    from evaluation.registry import NotInRegistry
    from serving.adapters import UnknownModel

    calls = []

    def fetch(name, ref, gated):
        calls.append(name)
        time.sleep(0.5)
        raise NotInRegistry(f"no registered model for {ref}")

    resolver._fetch = fetch
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda _: _outcome(resolver, "ghost-lora/1"), range(4)))
    assert outcomes == ["404"] * 4 and calls == ["ghost-lora/1"], (outcomes, calls)
    time.sleep(0.6)  # older than registry_retry_s: the next request asks the registry again, and waits for it
    assert _outcome(resolver, "ghost-lora/1") == "404" and len(calls) == 2
    with pytest.raises(UnknownModel):
        resolver.resolve("ghost-lora/1")


def test_a_stale_answer_is_looked_up_again_not_answered_503(resolver):
    from evaluation.registry import NotInRegistry

    resolver._fetch = lambda name, ref, gated: (_ for _ in ()).throw(NotInRegistry("gone"))
    assert _outcome(resolver, "late-lora/2", wait_s=5) == "404"
    time.sleep(0.6)
    future = resolver.pending("late-lora/2")
    assert future is not None  # a new look-up: the request waits for it instead of a 503 "still being fetched"
    future.exception(timeout=5)
    assert _outcome(resolver, "late-lora/2", wait_s=5) == "404"


def test_public_views_carry_no_address_errors_or_references(resolver):
    from serving.adapters import public_state

    resolver.watch._failed("OSError: [Errno 2] /srv/lorafleet/runs/serve/adapters/replica-1/x: no such file")
    shown = public_state(resolver.state())
    text = repr(shown)
    assert shown["registry"]["reachable"] is False
    assert "127.0.0.1:9" not in text and "/srv/" not in text and "u:p" not in text
    full = resolver.state()  # /admin/stats: the address (without credentials) and the error
    assert full["registry"]["uri"] == "http://127.0.0.1:9" and "/srv/" in full["registry"]["last_error"]


def _outcome(resolver, name: str, wait_s: float = 5) -> str:
    from serving.adapters import AdapterUnavailable, UnknownModel

    try:
        resolver.resolve(name, wait_s=wait_s)
    except UnknownModel:
        return "404"
    except AdapterUnavailable as exc:
        return f"503 {exc}"
    return "200"


def test_a_registry_deadline_past_the_request_timeout_is_refused(tiny_pipe_dir, tmp_path):
    from tests.serving.conftest import tiny_serve_args

    with pytest.raises(ValueError, match="registry_deadline_s .* lower registry_deadline_s"):
        tiny_serve_args(tiny_pipe_dir, {}, tmp_path, registry_deadline_s=90, **{"deployment.request_timeout_s": 60})


def test_a_registry_that_refuses_the_credentials_is_told_apart_from_one_that_is_down(resolver):
    """HTTP 401/403 from MLflow: waiting will not help, so neither the log nor the client's 503 says "does not
    answer"; /admin/stats (health) says refused_credentials."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

    from evaluation.registry import RegistryError
    from serving.adapters import AdapterUnavailable
    from serving.registry_watch import refused_credentials

    def refusing(*_):
        raise MlflowException("API request failed with error code 401 != 200", error_code=UNAUTHENTICATED)

    wrapped = RegistryError("downloading x/1 failed")
    wrapped.__cause__ = MlflowException("403", error_code=PERMISSION_DENIED)
    assert refused_credentials(wrapped) and not refused_credentials(ConnectionRefusedError("refused"))
    assert not reached_registry(wrapped)  # an outage for serving (nothing to serve from), only worded apart

    resolver._fetch = lambda name, ref, gated: refusing()
    with pytest.raises(AdapterUnavailable, match="refused this server's credentials"):
        resolver.resolve("locked-lora/1", wait_s=5)
    watch = resolver.watch
    assert watch.down() and watch.health()["refused_credentials"] is True
    assert "MLFLOW_TRACKING_TOKEN" in watch.health()["last_error"]
    time.sleep(0.6)  # past registry_retry_s: the next request starts a retry in the background and answers at once
    with pytest.raises(AdapterUnavailable, match="refuses this server's credentials") as info:
        resolver.resolve("other-lora/1", wait_s=5)
    assert "MLFLOW_TRACKING" not in str(info.value)  # operator advice stays in the log and /admin/stats
    watch.call(lambda: "answer")  # credentials fixed: the next answer clears it
    assert not watch.down() and watch.health()["refused_credentials"] is False
