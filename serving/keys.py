"""``lorafleet keys``: issue, list and revoke tenants' API keys (the keys file of serving/tenants.py).

    lorafleet keys add acme                       # prints the key once (stdout); the file keeps its SHA-256 only
    KEY=$(lorafleet keys add acme --no-see-shared)  # scripts: stdout is the key alone, notes go to stderr
    lorafleet keys list [--json]
    lorafleet keys revoke acme --key 1a2b3c4d     # one key; without --key every key of acme
    python -m serving.keys add acme --keys-file /etc/lorafleet/keys.json

The file is ``--keys-file``, else the serve config's ``tenants.keys_file`` (``--config``, default
configs/serve.yaml), else runs/serve/keys.json. A running server reads the changes within ``tenants.reload_s``.
Exit codes: 0 done, 1 no such tenant or key, 2 bad arguments or an unreadable keys file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from serving.config import PROJECT_ROOT, project_path
from serving.tenants import add_key, read_keys, revoke_keys

DEFAULT_FILE = "runs/serve/keys.json"


def configured_file(config: Path) -> str | None:
    """``tenants.keys_file`` of a serve config's first application (or a plain args mapping), or None."""
    try:
        data = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    if isinstance(data, dict) and "applications" in data:
        data = ((data.get("applications") or [{}])[0] or {}).get("args") or {}
    tenants = data.get("tenants") if isinstance(data, dict) else None
    return tenants.get("keys_file") if isinstance(tenants, dict) else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafleet keys", description="Tenants' API keys for the Serve app.")
    p.add_argument("--keys-file", help=f"the keys file (default: the config's tenants.keys_file, else {DEFAULT_FILE})")
    p.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "serve.yaml"), help="serve config to read")
    sub = p.add_subparsers(dest="verb", required=True)
    add = sub.add_parser("add", help="issue a key for TENANT (created when new); prints it once")
    add.add_argument("tenant")
    add.add_argument("--admin", action=argparse.BooleanOptionalAction, help="may call /admin/* (new: no)")
    add.add_argument(
        "--see-shared", action=argparse.BooleanOptionalAction, help="sees adapters marked shared (new: yes)"
    )
    listing = sub.add_parser("list", help="tenants and their key ids (never keys or hashes)")
    listing.add_argument("--json", action="store_true", help="machine-readable")
    revoke = sub.add_parser("revoke", help="remove one key of TENANT (--key ID) or all of them")
    revoke.add_argument("tenant")
    revoke.add_argument("--key", help="the key id `list` shows; omitted: every key of the tenant")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    named = a.keys_file or configured_file(Path(a.config))
    path = Path(project_path(named or DEFAULT_FILE))
    try:
        if a.verb == "add":
            key, key_id = add_key(path, a.tenant, sees_shared=a.see_shared, admin=a.admin)
            print(key)
            print(f"tenant {a.tenant!r}: key {key_id} added to {path}; only its SHA-256 is stored, so copy the key "
                  "now: it is not shown again", file=sys.stderr)  # fmt: skip
            if not named:
                print(f"the server reads keys only from tenants.keys_file: set it to {path} in {a.config}",
                      file=sys.stderr)  # fmt: skip
        elif a.verb == "revoke":
            gone = revoke_keys(path, a.tenant, a.key)
            print(f"revoked {len(gone)} key(s) of {a.tenant!r}: {', '.join(gone) or '-'} ({path})")
        else:
            _list(path, a.json)
    except ValueError as exc:  # a bad tenant name, or a keys file that cannot be read (KeysFileError)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    return 0


def _list(path: Path, as_json: bool) -> None:
    doc = read_keys(path)
    rows = [
        {"tenant": name, "admin": t.admin, "sees_shared": t.sees_shared, "keys": [k.id for k in t.keys],
         "created": [k.created for k in t.keys]}
        for name, t in sorted(doc.tenants.items())
    ]  # fmt: skip
    if as_json:
        print(json.dumps({"keys_file": str(path), "tenants": rows}, indent=2))
        return
    print(f"keys file {path}" + ("" if path.exists() else " (not written yet: `lorafleet keys add TENANT`)"))
    for r in rows:
        keys = ", ".join(f"{i} ({c})" for i, c in zip(r["keys"], r["created"])) or "no keys"
        flags = f"admin={'yes' if r['admin'] else 'no':3s} sees_shared={'yes' if r['sees_shared'] else 'no':3s}"
        print(f"  {r['tenant']:20s} {flags} {keys}")


if __name__ == "__main__":
    sys.exit(main())
