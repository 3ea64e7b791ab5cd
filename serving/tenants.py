"""Tenants: API keys that name who is calling, kept hashed at rest, and the namespacing that keeps tenants apart.

    lorafleet keys add acme                 # prints a new key ONCE; the keys file keeps only its SHA-256
    lorafleet keys list                     # tenants, key ids, when issued (never a key or a hash)
    lorafleet keys revoke acme [--key ID]   # one key, or all of the tenant's; the server follows within reload_s

Who a request is (``KeyRing.tenant_for``): the ``api_key_env`` key is the default tenant (``tenants.default_tenant``,
an admin), so a deployment with one key works as before; a keys file (``tenants.keys_file``, written by the CLI) and
the same JSON document in an environment variable (``tenants.keys_env``) add tenants. With no key configured at all
the server is open, as before, and every request is the default tenant.

Hash: plain SHA-256 of the key. The keys are 256 random bits from ``secrets.token_urlsafe(32)``, so inverting their
hash is a 2^256 search however fast the hash is; a password KDF (bcrypt, scrypt, Argon2) exists to slow the guessing
of low-entropy, human-chosen secrets and would add its cost to every request without making these keys safer. This
is the usual choice for machine-generated tokens (Laravel's token guard stores ``hash('sha256', $token)``,
laravel.com/docs/5.8/api-authentication#hashing-tokens; Apigee hashes OAuth tokens with SHA-256,
docs.apigee.com/api-services/content/hashing-tokens; the reasoning: security.stackexchange.com/q/232753). A leaked
keys file therefore gives no working key. Lookup hashes the presented key and compares it with EVERY stored hash by
``hmac.compare_digest``, so the time taken does not depend on which key (or how much of one) matched.

Namespacing, for every route that names something a tenant owns:

- registry models: ``registry_name("acme", "my-style")`` -> ``acme--my-style``; ``owner_of`` reads it back (also
  from ``acme--my-style@champion`` and ``acme--my-style/3``). MLflow refuses only '/' and ':' in registered model
  names (``mlflow.utils.validation._validate_model_name``), and the served name pattern (``serving.config.MODEL_NAME``)
  allows '-', so the name works in MLflow and as ``model`` alike. Tenant names never contain '--', so the name
  splits at its first '--'. Names without an owner (every model registered before tenants) belong to the operator.
- adapters: a tenant sees its own, those with no owner, and those marked shared (the registered-model tag
  ``lorafleet.shared=true``, ``mark_shared``) unless its ``sees_shared`` is off (``Tenant.sees``). Configured names
  (``adapters``, the champion) are the operator's. Another tenant's name is a 404 worded as for a missing one.
- files, jobs, images: ``require_owner`` raises ``NotFound`` with the same words as for an id that does not exist.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator

from serving.config import MODEL_NAME, TENANT_MAX, TENANT_NAME, TenantArgs, workdir_path
from training.config import _Section

log = logging.getLogger(__name__)
SEP = "--"  # <tenant>--<name>
KEY_PREFIX = "lfk_"  # makes a leaked key recognisable to secret scanners; carries no entropy
TAG_SHARED = "lorafleet.shared"  # registered-model tag "true": every tenant (with sees_shared) may use the model
STATE_KEY = "tenant"  # the request's Tenant under scope["state"] (Starlette's request.state.tenant)
T = TypeVar("T")


@dataclass(frozen=True)
class Tenant:
    """Who a request is. ``sees_shared``: adapters other tenants marked shared are visible; ``admin``: may call
    ``/admin/*`` (the default tenant is one)."""

    name: str
    sees_shared: bool = True
    admin: bool = False

    def sees(self, owner: str | None, shared: bool = False) -> bool:
        """Whether an adapter owned by ``owner`` (None: the operator's) and marked ``shared`` is visible."""
        return owner is None or owner == self.name or (shared and self.sees_shared)


class NotFound(LookupError):
    """An id that does not exist, or one of another tenant's, worded the same (HTTP 404)."""

    def __init__(self, kind: str, ident: str, param: str | None = None):
        self.kind, self.ident, self.param = kind, ident, param  # param: the request field that named it
        super().__init__(f"no {kind} {ident[:80]!r}")


class KeysFileError(ValueError):
    """A keys file or keys document that cannot be read; the message names it and every problem."""


def check_tenant_name(name: str) -> str:
    """``name`` when it is a tenant name; else ValueError saying what one is."""
    if not TENANT_NAME.match(name) or len(name) > TENANT_MAX:
        raise ValueError(
            f"tenant {name[:80]!r}: use lower-case letters and digits, words joined by one '-' or '_' (no '--'), at "
            f"most {TENANT_MAX} characters"
        )
    return name


def registry_name(tenant: Tenant | str, name: str) -> str:
    """The registered model name ``<tenant>--<name>`` for a tenant's model ``name``.

    Raises:
        ValueError: the tenant is no tenant name, or the result is not a servable model name (``MODEL_NAME``: letters,
            digits, '_', '-', '.', at most 64 characters).
    """
    owner = check_tenant_name(tenant.name if isinstance(tenant, Tenant) else tenant)
    full = f"{owner}{SEP}{name}"
    if not MODEL_NAME.match(full) or "@" in full or "/" in full:
        raise ValueError(
            f"model name {name[:80]!r}: with the tenant prefix {owner + SEP!r} it must be letters, digits, '_', '-', "
            f"'.' and at most 64 characters ({64 - len(owner) - len(SEP)} left for the name)"
        )
    return full


def owner_of(model: str) -> str | None:
    """The tenant a model name (``<tenant>--<name>``, with or without ``@alias`` or ``/version``) belongs to; None
    for a name without a tenant prefix (the operator's). The prefix is read in any letter case, as a registry with a
    case-insensitive collation finds ``acme--x`` when asked for ``ACME--x``."""
    registered = model.split("@", 1)[0].split("/", 1)[0]
    owner, sep, rest = registered.partition(SEP)
    owner = owner.lower()  # registries on MySQL/SQL Server compare names case-insensitively: ACME--x is acme's
    return owner if sep and rest and TENANT_NAME.match(owner) and len(owner) <= TENANT_MAX else None


def require_owner(tenant: Tenant, owner: str | None, kind: str, ident: str, param: str | None = None) -> None:
    """For files, jobs and other records a tenant creates: pass when ``tenant`` owns the record, else raise
    ``NotFound(kind, ident, param)`` — the error a missing id gets (raise the same for those), so another tenant's
    ids cannot be told from unused ones. The HTTP layer answers it with a 404."""
    if owner is None or owner != tenant.name:
        raise NotFound(kind, ident, param)


def tenant_of(request: Any) -> Tenant:
    """The tenant the HTTP gate (``serving.http.Gate``) resolved for ``request`` (a Starlette Request).

    Raises:
        LookupError: none was resolved (a public route such as /healthz, called without a key).
    """
    tenant = (request.scope.get("state") or {}).get(STATE_KEY)
    if not isinstance(tenant, Tenant):
        raise LookupError(f"no tenant on {request.url.path}: only routes behind the API key have one")
    return tenant


def mark_shared(client: Any, model: str, shared: bool = True) -> None:
    """Tag registered model ``model`` as visible to every tenant (``shared``) or only to its owner (an MlflowClient)."""
    if shared:
        client.set_registered_model_tag(model, TAG_SHARED, "true")
    else:
        client.delete_registered_model_tag(model, TAG_SHARED)


# ---- the keys file ---------------------------------------------------------------------------------------------
def hash_key(key: str) -> str:
    """The hex SHA-256 stored for ``key`` (see the module docstring for why SHA-256)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh API key: ``lfk_`` + 32 random bytes from ``secrets`` (43 base64url characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyEntry(_Section):
    id: str = Field(pattern=r"^[0-9a-f]{8}$", description="public id of the key (8 hex) for list and revoke")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key; the key is never stored")
    created: str = Field(description="when the key was issued (UTC, ISO 8601)")


class TenantEntry(_Section):
    sees_shared: bool = Field(True, description="the tenant sees adapters other tenants marked shared")
    admin: bool = Field(False, description="the tenant may call /admin/reload and /admin/stats")
    keys: list[KeyEntry] = Field(default_factory=list, description="its keys; a tenant without keys cannot call")


class KeysDocument(_Section):
    format: Literal["lorafleet-keys/1"] = Field("lorafleet-keys/1", description="this layout's name and version")
    hash: Literal["sha256"] = Field("sha256", description="how keys are hashed: hex SHA-256 of the UTF-8 key")
    tenants: dict[str, TenantEntry] = Field(default_factory=dict, description="tenant name -> its keys")

    @field_validator("tenants")
    @classmethod
    def _names(cls, value: dict[str, TenantEntry]) -> dict[str, TenantEntry]:
        for name in value:
            check_tenant_name(name)
        return value

    @model_validator(mode="after")
    def _unique(self) -> KeysDocument:
        ids = [k.id for t in self.tenants.values() for k in t.keys]
        hashes = [k.sha256 for t in self.tenants.values() for k in t.keys]
        if len(set(ids)) < len(ids) or len(set(hashes)) < len(hashes):
            raise ValueError("a key id or hash appears twice: each key belongs to one tenant; remove the copy")
        return self


def parse_keys(text: str, source: str) -> KeysDocument:
    """A keys document from its JSON text.

    Raises:
        KeysFileError: not JSON or not the layout; names ``source`` and every problem.
    """
    try:
        return KeysDocument.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'document'}: {e['msg']}" for e in exc.errors())
        raise KeysFileError(
            f"{source}: {problems}. Write keys with `lorafleet keys add TENANT`, or fix the JSON by hand"
        ) from exc


def read_keys(path: Path) -> KeysDocument:
    """The keys file at ``path``; an empty document when it does not exist.

    Raises:
        KeysFileError: see ``parse_keys``; also a file that exists but cannot be read (permissions, a folder).
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return KeysDocument()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"{path}: cannot be read ({exc}); make it a file the server's user can read") from exc
    return parse_keys(text, str(path))


def write_keys(path: Path, doc: KeysDocument) -> None:
    """Replace the keys file atomically: a temporary file in the same folder (mode 0600), fsynced, then
    ``os.replace`` — a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(doc.model_dump_json(indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    folder = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a crash once the folder is synced
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer at a time (two `keys add` at once would otherwise lose one key): a lock file next to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_keys(path: Path, change: Callable[[KeysDocument], T]) -> T:
    """Read, ``change`` in place and write back the keys file under its lock; returns what ``change`` returned.
    Nothing is written when ``change`` raises."""
    with _locked(path):
        doc = read_keys(path)
        out = change(doc)
        write_keys(path, KeysDocument.model_validate(doc.model_dump()))  # validated again before it is written
        return out


def add_key(path: Path, tenant: str, *, sees_shared: bool | None = None, admin: bool | None = None) -> tuple[str, str]:
    """Issue a key for ``tenant`` (created when new: sees_shared True, admin False; None keeps a setting).

    Returns:
        ``(key, key id)``: the key itself exists only in this return value.
    """
    check_tenant_name(tenant)
    key, key_id = new_key(), secrets.token_hex(4)
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    def change(doc: KeysDocument) -> None:
        entry = doc.tenants.setdefault(tenant, TenantEntry())
        entry.sees_shared = entry.sees_shared if sees_shared is None else sees_shared
        entry.admin = entry.admin if admin is None else admin
        entry.keys.append(KeyEntry(id=key_id, sha256=hash_key(key), created=created))

    update_keys(path, change)
    return key, key_id


def revoke_keys(path: Path, tenant: str, key_id: str | None = None) -> list[str]:
    """Remove one key of ``tenant`` (``key_id``) or all of them; returns the ids removed.

    Raises:
        KeyError: no such tenant, or no such key of it (nothing is written).
    """

    def change(doc: KeysDocument) -> list[str]:
        entry = doc.tenants.get(tenant)
        if entry is None:
            raise KeyError(f"no tenant {tenant!r} in {path}; `lorafleet keys list` shows them")
        gone = [k.id for k in entry.keys if key_id in (None, k.id)]
        if key_id is not None and not gone:
            raise KeyError(f"tenant {tenant!r} has no key {key_id!r}; `lorafleet keys list` shows its key ids")
        entry.keys = [k for k in entry.keys if k.id not in gone]
        return gone

    return update_keys(path, change)


# ---- lookup ----------------------------------------------------------------------------------------------------
class KeyRing:
    """API key -> Tenant for one server: the ``api_key_env`` key (the default tenant), the keys file (re-read within
    ``reload_s`` of a change) and the environment's keys document (read once: a process's environment is fixed).

    Raises (at construction):
        KeysFileError: the keys file or document cannot be read, or names a tenant twice or the default tenant.
    """

    def __init__(self, args: TenantArgs, api_key: str | None, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.args = args
        self.path = workdir_path(args.keys_file) if args.keys_file else None
        self.default = Tenant(args.default_tenant, sees_shared=True, admin=True)
        self._default = hashlib.sha256(api_key.encode()).digest() if api_key else None
        text = environ.get(args.keys_env, "").strip() if args.keys_env else ""
        self._env = parse_keys(text, f"${args.keys_env}") if text else None
        self._signature: tuple | None = ("unread",)
        self._entries: list[tuple[bytes, Tenant]] = []
        self._checked = float("-inf")
        self._lock = threading.Lock()
        self._reload(strict=True)

    @property
    def required(self) -> bool:
        """Whether requests need a key: one is configured anywhere (a configured keys file counts even while missing
        or empty, so deleting it never opens the server)."""
        return self._default is not None or self._env is not None or self.path is not None

    def tenant_for(self, key: str) -> Tenant | None:
        """The tenant whose key ``key`` is, or None. Compares the key's SHA-256 with every stored hash by
        ``hmac.compare_digest`` (no early exit), so timing tells nothing of which entry or prefix matched."""
        if self.path is not None and time.monotonic() >= self._checked + self.args.reload_s:
            self._reload(strict=False)
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for known, tenant in self._entries:
            if hmac.compare_digest(digest, known) and found is None:
                found = tenant
        return found

    def _reload(self, strict: bool) -> None:
        """Read the keys file again when it changed (inode, mtime, size); a broken file at start raises, later it
        is logged and the last good keys stay in force."""
        with self._lock:
            self._checked = time.monotonic()
            try:
                st = self.path.stat() if self.path is not None else None
            except FileNotFoundError:
                st = None
            except OSError as exc:  # its folder cannot be searched: as a broken file (KeysFileError below)
                if strict:
                    raise KeysFileError(f"{self.path}: cannot be read ({exc})") from exc
                log.error("keeping the previous API keys: %s: cannot be read (%s)", self.path, exc)
                return
            signature = (st.st_ino, st.st_mtime_ns, st.st_size) if st else None
            if signature == self._signature:
                return
            try:
                doc = read_keys(self.path) if self.path is not None else KeysDocument()
                self._entries = self._build(doc)
            except KeysFileError as exc:
                if strict:
                    raise
                log.error("keeping the previous API keys: %s", exc)
            self._signature = signature

    def _build(self, file_doc: KeysDocument) -> list[tuple[bytes, Tenant]]:
        entries = [(self._default, self.default)] if self._default is not None else []
        env = self._env.tenants if self._env else {}
        both = sorted(set(env) & set(file_doc.tenants))
        if both:
            raise KeysFileError(f"tenants {both} are in both {self.path} and ${self.args.keys_env}: keep each in one")
        for name, entry in {**file_doc.tenants, **env}.items():
            if name == self.default.name:
                raise KeysFileError(
                    f"tenant {name!r} is tenants.default_tenant, the api_key_env key's tenant: name it otherwise"
                )
            tenant = Tenant(name, sees_shared=entry.sees_shared, admin=entry.admin)
            entries += [(bytes.fromhex(k.sha256), tenant) for k in entry.keys]
        return entries
