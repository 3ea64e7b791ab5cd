"""Tenants: the keys file (hashed at rest, atomic, revocable, constant-time lookup), the ``lorafleet keys`` CLI, the
namespacing helpers, and isolation on every route that takes a name or id — through the app's HTTP layer
(``serving.http``, in process as in test_http.py) in front of a real engine over a real (SQLite) registry."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.config import TenantArgs
from serving.tenants import (
    KeyRing,
    KeysFileError,
    NotFound,
    Tenant,
    add_key,
    hash_key,
    owner_of,
    read_keys,
    registry_name,
    require_owner,
    revoke_keys,
)

PROMPT = "a red circle on a sks background"


def ring(path: Path, api_key: str | None = None, environ: dict | None = None, **args) -> KeyRing:
    return KeyRing(TenantArgs(keys_file=str(path), reload_s=0, **args), api_key, environ or {})


# ---- the keys file ---------------------------------------------------------------------------------------------
def test_a_key_round_trips_through_the_file_which_holds_only_its_hash(tmp_path):
    path = tmp_path / "keys.json"
    key, key_id = add_key(path, "acme")
    other, _ = add_key(path, "bravo", sees_shared=False, admin=True)
    text = path.read_text()
    assert key not in text and key.removeprefix("lfk_") not in text and other not in text  # never the key itself
    assert hashlib.sha256(key.encode()).hexdigest() in text and hash_key(key) in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left behind
    doc = read_keys(path)
    assert [k.id for k in doc.tenants["acme"].keys] == [key_id] and doc.tenants["bravo"].admin
    keys = ring(path)
    assert keys.tenant_for(key) == Tenant("acme", sees_shared=True, admin=False)
    assert keys.tenant_for(other) == Tenant("bravo", sees_shared=False, admin=True)
    assert keys.tenant_for(key + "x") is None and keys.tenant_for("") is None
    assert keys.tenant_for(hash_key(key)) is None  # the stored hash is not a key


def test_a_relative_keys_file_means_the_checkout_serve_started_from(tmp_path, monkeypatch):
    """`lorafleet serve tenants.keys_file=runs/serve/keys.json`: the replicas run in an uploaded copy of the project
    (no runs/), so a relative keys file is under $LORAFLEET_WORKDIR, where `lorafleet keys add` wrote it."""
    key, _ = add_key(tmp_path / "runs" / "serve" / "keys.json", "acme")
    monkeypatch.setenv("LORAFLEET_WORKDIR", str(tmp_path))
    keys = KeyRing(TenantArgs(keys_file="runs/serve/keys.json", reload_s=0), None, {})
    assert keys.path == tmp_path / "runs" / "serve" / "keys.json" and keys.tenant_for(key).name == "acme"


def test_revoking_one_key_or_all_takes_effect_on_a_running_ring_and_bad_names_write_nothing(tmp_path):
    path = tmp_path / "keys.json"
    first, first_id = add_key(path, "acme")
    second, _ = add_key(path, "acme")
    keys = ring(path)
    assert keys.tenant_for(first) and keys.tenant_for(second)
    assert revoke_keys(path, "acme", first_id) == [first_id]
    assert keys.tenant_for(first) is None and keys.tenant_for(second) == Tenant("acme")
    before = path.read_bytes()
    for tenant, key_id in (("nobody", None), ("acme", "00000000")):
        with pytest.raises(KeyError):
            revoke_keys(path, tenant, key_id)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="lower-case"):
        add_key(path, "Acme--x")
    assert path.read_bytes() == before
    assert len(revoke_keys(path, "acme")) == 1 and keys.tenant_for(second) is None
    assert keys.required  # a keys file without keys still needs a key: nothing opens up


def test_lookup_compares_every_stored_hash_in_constant_time(tmp_path, monkeypatch):
    import serving.tenants as tenants

    path = tmp_path / "keys.json"
    issued = [add_key(path, name)[0] for name in ("acme", "bravo", "carol")]
    keys = ring(path, api_key="the-env-key")
    calls = []

    def spy(a, b):
        calls.append((len(a), len(b)))
        return a == b

    monkeypatch.setattr(tenants.hmac, "compare_digest", spy)
    for key, expected in [("the-env-key", "default"), (issued[0], "acme"), (issued[2], "carol"), ("wrong", None)]:
        calls.clear()
        found = keys.tenant_for(key)
        assert (found.name if found else None) == expected
        assert calls == [(32, 32)] * 4, f"{key}: every entry is compared (no early exit), digests of equal length"


def test_the_environment_form_and_the_api_key_env_key_join_the_file_and_conflicts_are_refused(tmp_path):
    path = tmp_path / "keys.json"
    acme, _ = add_key(path, "acme")
    env_file = tmp_path / "env.json"
    dana, _ = add_key(env_file, "dana")
    environ = {"LORAFLEET_KEYS": env_file.read_text()}
    keys = ring(path, api_key="legacy-key", environ=environ)
    assert keys.tenant_for("legacy-key") == Tenant("default", sees_shared=True, admin=True)
    assert keys.tenant_for(acme).name == "acme" and keys.tenant_for(dana).name == "dana"
    only_env = KeyRing(TenantArgs(), None, environ)
    assert only_env.required and only_env.tenant_for(dana).name == "dana" and only_env.tenant_for(acme) is None
    add_key(env_file, "acme")
    with pytest.raises(KeysFileError, match="both"):
        ring(path, environ={"LORAFLEET_KEYS": env_file.read_text()})
    with pytest.raises(KeysFileError, match="default_tenant"):
        ring(path, default_tenant="acme")
    with pytest.raises(KeysFileError, match=r"\$LORAFLEET_KEYS"):
        ring(path, environ={"LORAFLEET_KEYS": '{"tenants": {"x": {"keys": [{"id": "1"}]}}}'})


def test_a_broken_keys_file_stops_a_start_but_not_a_running_server(tmp_path):
    path = tmp_path / "keys.json"
    key, _ = add_key(path, "acme")
    keys = ring(path)
    path.write_text('{"tenants": {"acme": {"keys": "oops"}}}')
    assert keys.tenant_for(key) == Tenant("acme")  # the last good keys stay in force
    with pytest.raises(KeysFileError, match=re.escape(str(path))):
        ring(path)
    path.unlink()
    path.mkdir()  # a keys file the server cannot read (as one of mode 000 for another user): refused, not a 500
    assert keys.tenant_for(key) == Tenant("acme")
    with pytest.raises(KeysFileError, match="cannot be read"):
        ring(path)
    missing = ring(tmp_path / "never-written.json")
    assert missing.required and missing.tenant_for("anything") is None
    open_server = KeyRing(TenantArgs(), None, {})
    assert not open_server.required  # no key anywhere: open, as before tenants


def test_the_keys_cli_prints_the_key_once_and_lists_and_revokes(tmp_path, capsys):
    from cluster.cli import main as lorafleet

    path = tmp_path / "keys.json"
    assert lorafleet(["keys", "--keys-file", str(path), "add", "acme", "--admin"]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("lfk_") and len(key) > 40 and "\n" not in key and "only its SHA-256" in out.err
    assert ring(path).tenant_for(key) == Tenant("acme", admin=True)
    assert lorafleet(["keys", "--keys-file", str(path), "list", "--json"]) == 0
    listed = capsys.readouterr().out
    [row] = json.loads(listed)["tenants"]
    assert row["tenant"] == "acme" and row["admin"] and key not in listed and hash_key(key) not in listed
    assert lorafleet(["keys", "--keys-file", str(path), "revoke", "acme", "--key", row["keys"][0]]) == 0
    assert ring(path).tenant_for(key) is None
    assert lorafleet(["keys", "--keys-file", str(path), "revoke", "nobody"]) == 1
    assert lorafleet(["keys", "--keys-file", str(path), "add", "Bad--Name"]) == 2
    config = tmp_path / "serve.yaml"  # without --keys-file: the serve config's tenants.keys_file
    config.write_text(f"applications:\n  - args:\n      tenants: {{keys_file: {tmp_path / 'from-config.json'}}}\n")
    assert lorafleet(["keys", "--config", str(config), "add", "bravo"]) == 0
    assert "bravo" in read_keys(tmp_path / "from-config.json").tenants


# ---- namespacing -----------------------------------------------------------------------------------------------
def test_registry_names_carry_their_tenant_and_foreign_ids_read_as_missing():
    name = registry_name("acme", "my-style")
    assert name == "acme--my-style" and registry_name(Tenant("acme"), "v1.2") == "acme--v1.2"
    assert [owner_of(n) for n in (name, f"{name}@champion", f"{name}/3", "toy-sks-lora", "x--", "A_--b")] == [
        "acme", "acme", "acme", None, None, None,
    ]  # fmt: skip
    # a registry on MySQL / SQL Server (case-insensitive collations) finds acme--my-style for these: acme's too
    assert [owner_of(n) for n in ("ACME--my-style", "Acme--my-style@champion", "A--b")] == ["acme", "acme", "a"]
    assert not Tenant("bravo").sees(owner_of("ACME--my-style"))
    for bad_tenant, bad_name in (("acme--x", "s"), ("Acme", "s"), ("acme", "a/b"), ("acme", "x" * 60)):
        with pytest.raises(ValueError):
            registry_name(bad_tenant, bad_name)
    acme = Tenant("acme")
    require_owner(acme, "acme", "file", "file-1")
    with pytest.raises(NotFound) as theirs:
        require_owner(acme, "bravo", "file", "file-1", "file_id")
    with pytest.raises(NotFound) as unowned:
        require_owner(acme, None, "file", "file-1", "file_id")
    assert (
        str(theirs.value) == str(unowned.value) == str(NotFound("file", "file-1")) and theirs.value.param == "file_id"
    )
    assert acme.sees(None) and acme.sees("acme") and acme.sees("bravo", shared=True) and not acme.sees("bravo")
    assert not Tenant("carol", sees_shared=False).sees("bravo", shared=True)


# ---- isolation over HTTP ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tenant_registry(tmp_path_factory, tiny_adapters) -> str:
    """toy-plain (no tenant), acme--style, bravo--style, bravo--public (shared) — each with a champion."""
    from evaluation.registry import client_for
    from serving.tenants import mark_shared
    from tests.serving.conftest import register_adapter

    uri = f"sqlite:///{tmp_path_factory.mktemp('tenant-registry') / 'mlflow.db'}"
    for name, adapter in (("toy-plain", "ad0"), ("acme--style", "ad1"), ("bravo--style", "ad2"),
                          ("bravo--public", "ad3")):  # fmt: skip
        assert register_adapter(uri, name, tiny_adapters[adapter], status="passed") == "1"
    mark_shared(client_for(uri), "bravo--public")
    return uri


class EngineGenerator:
    """The Generator deployment's calls, in process, over a real engine (no Ray, no batching)."""

    def __init__(self, engine):
        self.engine = engine

    async def generate(self, req, epoch: int = 0) -> dict:
        from serving.app import encode, error_result

        try:
            prepared = self.engine.prepare(req)
        except Exception as exc:  # noqa: BLE001 - as Generator.generate: every failure becomes a typed error
            return error_result(exc)
        [out] = self.engine.generate([prepared])
        return error_result(out) if isinstance(out, Exception) else encode(out)

    async def models(self, tenant=None) -> dict:
        from serving.app import Generator

        return Generator.func_or_class._models(self, tenant)  # the deployment's own listing code

    async def stats(self) -> dict:
        return {"adapter_cache": self.engine.stats()}


@pytest.fixture
def tenant_server(monkeypatch, tmp_path, serve_args, tenant_registry):
    """The HTTP layer with keys for acme, bravo and carol (sees_shared off) in a keys file, plus the legacy env key."""
    from fastapi.testclient import TestClient
    from ray import serve

    from serving.engine import Engine
    from serving.http import Api, web
    from serving.shared_stores import ImageUrls
    from tests.serving.test_http import Remote

    path = tmp_path / "keys.json"
    keys = {name: add_key(path, name, sees_shared=name != "carol")[0] for name in ("acme", "bravo", "carol")}
    keys["default"] = "legacy-key"
    monkeypatch.setenv("LORAFLEET_TEST_TENANTS_KEY", keys["default"])
    args = serve_args(
        **{"tracking_uri": tenant_registry, "champion.poll_s": 3600, "api_key_env": "LORAFLEET_TEST_TENANTS_KEY",
           "tenants.keys_file": str(path), "tenants.reload_s": 0, "defaults.steps": 2}
    )  # fmt: skip
    urls = ImageUrls.func_or_class(args.image_urls.model_dump())
    engine = Engine.from_args(args)
    engine.resolver.refresh()  # as a replica does before it reports ready: the registry's listing
    api = Api.func_or_class.__mro__[1](Remote(EngineGenerator(engine)), args, Remote(urls))
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=api))
    with TestClient(web) as http:
        yield SimpleNamespace(http=http, keys=keys, path=path)


def as_(server, tenant: str) -> dict:
    return {"Authorization": f"Bearer {server.keys[tenant]}"}


@pytest.mark.slow
def test_models_lists_own_shared_and_unowned_adapters_only(tenant_server):
    def listed(tenant: str) -> set[str]:
        r = tenant_server.http.get("/v1/models", headers=as_(tenant_server, tenant))
        assert r.status_code == 200, r.text
        return {m["id"] for m in r.json()["data"]}

    configured = {"base", "ad0", "ad1", "ad2", "ad3"}
    plain, public = {"toy-plain", "toy-plain/1"}, {"bravo--public", "bravo--public/1"}
    assert listed("acme") == configured | plain | public | {"acme--style", "acme--style/1"}
    assert listed("bravo") == configured | plain | public | {"bravo--style", "bravo--style/1"}
    assert listed("carol") == configured | plain  # sees_shared off
    assert listed("default") == configured | plain | public


@pytest.mark.slow
@pytest.mark.parametrize("route", ["/v1/images/generations", "/v1/generate"])
def test_another_tenants_adapter_is_a_404_worded_as_a_missing_one(tenant_server, route):
    def ask(tenant: str, model: str):
        if route == "/v1/generate":
            params = {"prompt": PROMPT, "adapter": model, "seed": 1}
            return tenant_server.http.get(route, params=params, headers=as_(tenant_server, tenant))
        body = {"prompt": PROMPT, "model": model, "seed": 1}
        return tenant_server.http.post(route, json=body, headers=as_(tenant_server, tenant))

    for model in ("acme--style", "toy-plain", "bravo--public", "ad0", "acme--style@champion", "acme--style/1"):
        answer = ask("acme", model)
        assert answer.status_code == 200, (model, answer.text)
    hidden = [("acme", "bravo--style"), ("acme", "bravo--style@champion"), ("acme", "bravo--style/1"),
              ("bravo", "acme--style"), ("default", "acme--style"), ("carol", "bravo--public")]  # fmt: skip
    for tenant, model in hidden:
        theirs, missing = ask(tenant, model), ask(tenant, model.replace("style", "nothing").replace("public", "none"))
        assert theirs.status_code == missing.status_code == 404, (tenant, model, theirs.text)
        said = theirs.json()["error"]
        assert said["param"] == "model" and said == {
            **missing.json()["error"],
            "message": missing.json()["error"]["message"].replace("nothing", "style").replace("none", "public"),
        }, (said, missing.json())
    assert ask("bravo", "bravo--style").status_code == 200


@pytest.mark.slow
def test_an_image_url_is_its_tenants_only(tenant_server):
    body = {"prompt": PROMPT, "model": "base", "response_format": "url"}
    made = tenant_server.http.post("/v1/images/generations", json=body, headers=as_(tenant_server, "bravo"))
    path = made.json()["data"][0]["url"].removeprefix("http://testserver")
    assert tenant_server.http.get(path, headers=as_(tenant_server, "bravo")).status_code == 200
    image_id, unused = path.removeprefix("/v1/images/").removesuffix(".png"), "A" * 32
    theirs = tenant_server.http.get(path, headers=as_(tenant_server, "acme"))
    unknown = tenant_server.http.get(f"/v1/images/{unused}.png", headers=as_(tenant_server, "acme"))
    assert theirs.status_code == unknown.status_code == 404
    said, missing = theirs.json()["error"], unknown.json()["error"]
    assert said == missing | {"message": missing["message"].replace(unused, image_id)}, (said, missing)


@pytest.mark.slow
def test_keys_admin_routes_and_revocation_over_http(tenant_server):
    http = tenant_server.http
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/models", headers={"Authorization": "Bearer lfk_not-a-key"}).status_code == 401
    assert http.get("/healthz").status_code == 200  # public, no key
    for route in ("/admin/stats",):
        refused = http.get(route, headers=as_(tenant_server, "acme"))
        assert refused.status_code == 403 and "--admin" in refused.json()["error"]["message"], refused.text
        assert http.get(route, headers=as_(tenant_server, "default")).status_code == 200
    assert http.post("/admin/reload", headers=as_(tenant_server, "bravo")).status_code == 403
    revoke_keys(tenant_server.path, "acme")  # the running server reads the file again (reload_s 0)
    assert http.get("/v1/models", headers=as_(tenant_server, "acme")).status_code == 401
    assert http.get("/v1/models", headers=as_(tenant_server, "bravo")).status_code == 200
