"""Every dataset's registered model through the engine, without Ray: what the listing holds (champions, aliases,
gated versions only), a bare model name draws with its champion, gated or missing names are 404 at once, and a
registry that is down is a 503. The registry is a SQLite file built once for the module."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from serving.adapters import AdapterUnavailable, UnknownModel
from serving.app import error_result
from serving.catalog import model_cards
from serving.engine import Engine, ImageRequest
from serving.schemas import ModelList

PROMPT = "a red circle on a sks background"
SKS, OHWX = "cat-sks-lora", "cat-ohwx-lora"
CONFIGURED = ["base", "ad0", "ad1", "ad2", "ad3", "champion"]
LISTED = [OHWX, f"{OHWX}/1", SKS, f"{SKS}@previous", f"{SKS}/1", f"{SKS}/2"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_adapters) -> str:
    """Two datasets' models. cat-sks-lora: v1, v2 passed (champion 2, previous 1), v3 rejected. cat-ohwx-lora:
    v1 passed, v2 passed then rolled back (champion 1 again), v3 untagged. Plus an MLflow model not lorafleet's."""
    from evaluation.registry import TAG_STATUS, client_for, rollback
    from tests.serving.conftest import register_adapter

    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    ad = tiny_adapters
    assert register_adapter(uri, SKS, ad["ad0"], status="passed") == "1"
    assert register_adapter(uri, SKS, ad["ad1"], status="passed") == "2"
    assert register_adapter(uri, SKS, ad["ad2"], alias=None, status="rejected") == "3"
    assert register_adapter(uri, OHWX, ad["ad3"], status="passed") == "1"
    assert register_adapter(uri, OHWX, ad["ad0"], status="passed") == "2"
    assert rollback(client_for(uri), OHWX) == ("2", "1")
    assert register_adapter(uri, OHWX, ad["ad2"], alias=None) == "3"
    client = client_for(uri)
    client.create_registered_model("sklearn-model")
    run_id = client.search_model_versions(f"name='{SKS}'")[0].run_id
    client.create_model_version("sklearn-model", f"runs:/{run_id}/model", run_id, tags={TAG_STATUS: "passed"})
    client.set_registered_model_alias("sklearn-model", "champion", "1")
    return uri


@pytest.fixture
def fleet(serve_args, registry) -> Engine:
    """An engine whose champion is cat-sks-lora's, over the module's registry (no periodic look-ups)."""
    args = serve_args(**{"tracking_uri": registry, "champion.model": SKS, "champion.poll_s": 3600})
    engine = Engine.from_args(args)
    engine.resolver.refresh()  # what a replica does before it reports ready: the listing and the champion
    return engine


def cards(engine: Engine) -> dict[str, dict]:
    listed = model_cards(engine.resolver, set(engine.adapters.keys()))
    ModelList.model_validate({"data": listed})  # what GET /v1/models answers
    return {c["id"]: c for c in listed}


def draw(engine: Engine, model: str):
    """One small image (32 px, 2 steps): enough to tell adapters apart."""
    request = ImageRequest(PROMPT, model=model, seed=1, steps=2, width=32, height=32)
    [result] = engine.generate([engine.prepare(request)])
    assert not isinstance(result, Exception), result
    return result


def test_the_listing_holds_each_models_champion_aliases_and_gated_versions_only(fleet):
    listed = cards(fleet)
    assert list(listed) == CONFIGURED + LISTED  # not sks/3 (rejected), ohwx/2 (rolled back), ohwx/3, sklearn-model
    assert listed[SKS] == {
        "id": SKS, "kind": "registry", "ref": f"models:/{SKS}@champion", "registered_model": SKS, "version": "2",
        "aliases": ["champion"], "status": "passed", "loaded": False, "available": True,
    }  # fmt: skip
    assert (listed[f"{SKS}@previous"]["version"], listed[f"{SKS}/1"]["aliases"]) == ("1", ["previous"])
    assert listed[OHWX]["version"] == "1" and listed[OHWX]["aliases"] == ["champion"]
    champion = listed["champion"]
    assert champion["kind"] == "adapter" and (champion["registered_model"], champion["version"]) == (SKS, "2")
    draw(fleet, OHWX)
    assert cards(fleet)[f"{OHWX}/1"]["loaded"] and not cards(fleet)[f"{SKS}/2"]["loaded"]


def test_the_listing_is_read_once_per_poll_and_again_on_reload(fleet, registry, tiny_adapters, monkeypatch):
    import evaluation.registry as registry_module
    from tests.serving.conftest import register_adapter

    reads = []
    searched = registry_module.adapter_models
    monkeypatch.setattr(registry_module, "adapter_models", lambda client: reads.append(1) or searched(client))
    for _ in range(3):
        assert list(cards(fleet))[-len(LISTED) :] == LISTED
    assert len(reads) == 0  # read once when the replica started (the fixture's refresh), not per request
    register_adapter(registry, "cat-new-lora", tiny_adapters["ad1"], status="passed")
    assert "cat-new-lora" not in cards(fleet)  # cached for champion.poll_s
    fleet.resolver.refresh()  # POST /admin/reload
    assert {"cat-new-lora", "cat-new-lora/1"} <= cards(fleet).keys() and len(reads) == 1


def test_a_bare_model_name_draws_with_that_models_champion(fleet):
    images = []
    for name, version, same_weights in ((OHWX, "1", "ad3"), (SKS, "2", "ad1")):
        got, folder = draw(fleet, name), draw(fleet, same_weights)
        assert (got.model, got.version) == (name, version)
        images.append(np.asarray(got.images[0], dtype=np.int16))
        assert np.array_equal(images[-1], np.asarray(folder.images[0], dtype=np.int16)), name
    assert np.abs(images[0] - images[1]).mean() > 2  # two datasets' champions draw differently
    assert draw(fleet, "champion").version == "2"
    assert draw(fleet, f"{SKS}@previous").version == "1" and draw(fleet, f"{SKS}/1").version == "1"
    assert draw(fleet, f"{OHWX}/3").version == "3"  # untagged: served when named, though not listed


@pytest.mark.parametrize(
    ("name", "words"),
    [
        (f"{SKS}/3", "rejected by the evaluation gate .* lorafleet promote cat-sks-lora 3 --force"),
        (f"{OHWX}/2", "rolled back from champion .* lorafleet promote cat-ohwx-lora 2"),
        (f"{SKS}@challenger", "has no alias 'challenger'"),
        (f"{SKS}/99", "has no version 99"),
        ("no-such-lora", "has no alias 'champion'"),
        ("no-such-lora@previous", "has no alias 'previous'"),
    ],
)
def test_gated_and_missing_names_are_404_at_once(fleet, name, words):
    start = time.perf_counter()
    with pytest.raises(UnknownModel, match=words) as info:
        fleet.prepare(ImageRequest(PROMPT, model=name))
    assert time.perf_counter() - start < 2
    assert error_result(info.value)["error"] == {"status": 404, "message": str(info.value), "param": "model"}


def test_a_registry_that_is_down_is_a_503_and_the_listing_keeps_the_configured_names(serve_args, monkeypatch):
    from training.mlflow_server import free_port

    args = serve_args(**{"tracking_uri": f"http://127.0.0.1:{free_port()}", "champion.model": SKS})
    for key, value in args.registry_env().items():  # what build_app gives the replicas (runtime_env)
        monkeypatch.setenv(key, value)
    engine = Engine.from_args(args)
    start = time.perf_counter()
    with pytest.raises(AdapterUnavailable, match="registry did not answer") as info:
        engine.prepare(ImageRequest(PROMPT, model=f"{SKS}@previous"))
    assert error_result(info.value)["error"]["status"] == 503 and time.perf_counter() - start < 10
    engine.resolver.refresh()  # a replica's poll while the registry is down
    assert list(cards(engine)) == CONFIGURED and "Max retries exceeded" in (engine.resolver.catalog.error or "")
    assert draw(engine, "ad0").model == "ad0"  # configured folders still serve


def test_a_name_clash_lists_the_alias_instead_of_the_bare_name(serve_args, registry, tiny_adapters):
    args = serve_args(**{"tracking_uri": registry, f"adapters.{OHWX}": str(tiny_adapters["ad2"])})
    engine = Engine.from_args(args)
    engine.resolver.refresh()
    listed = cards(engine)
    assert listed[OHWX]["kind"] == "adapter" and f"{OHWX}@champion" in listed  # the configured folder wins
    assert draw(engine, OHWX).version is None and draw(engine, f"{OHWX}@champion").version == "1"
    assert Path(listed[OHWX]["ref"]) == tiny_adapters["ad2"]
