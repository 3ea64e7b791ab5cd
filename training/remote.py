"""Datasets behind a URI (``s3://``, ``gs://``, ``file://``): mirrored to a node-local cache through pyarrow.fs.

    local = local_copy("s3://bucket/datasets/toy-sks")      # ~/.cache/lorafleet/datasets/<key>/

The driver validates the mirror; every Train worker makes its own (on its node) from the same URI, so no
node needs the driver's disk. The cache key is the URI plus the listing (names, sizes, mtimes): a changed
dataset gets a new folder, an unchanged one is fetched once per node.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

DONE = ".complete"


def is_uri(path: str | os.PathLike | None) -> bool:
    return path is not None and "://" in str(path)


def cache_root() -> Path:
    return Path(os.environ.get("LORAFLEET_CACHE_DIR") or Path.home() / ".cache" / "lorafleet").expanduser()


def local_copy(uri: str, root: str | Path | None = None) -> Path:
    """This node's copy of the folder at ``uri`` (fetched when missing or changed).

    Raises:
        FileNotFoundError: ``uri`` is not a folder (names the URI and the fix).
        ValueError: the URI scheme has no filesystem here (e.g. ``s3://`` without pyarrow's S3 support).
    """
    from pyarrow import fs

    try:
        filesystem, base = fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pyarrow: unknown scheme / missing credentials
        raise ValueError(f"cannot open {uri}: {exc}; use s3://, gs:// or file:// (or a local folder)") from exc
    info = filesystem.get_file_info(base)
    if info.type != fs.FileType.Directory:
        raise FileNotFoundError(f"{uri} is not a folder; point data.path at the dataset folder")
    files = [f for f in filesystem.get_file_info(fs.FileSelector(base, recursive=True)) if f.type == fs.FileType.File]
    listing = "\n".join(
        f"{Path(f.path).relative_to(base)}\0{f.size}\0{f.mtime_ns or 0}" for f in sorted(files, key=lambda f: f.path)
    )
    key = hashlib.sha256(f"{uri}\n{listing}".encode()).hexdigest()[:16]
    target = Path(root or cache_root() / "datasets") / f"{Path(base).name or 'data'}-{key}"
    if (target / DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        for f in files:
            rel = Path(f.path).relative_to(base)
            if ".." in rel.parts:
                continue
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            with filesystem.open_input_stream(f.path) as src, open(dst, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        (tmp / DONE).write_text(uri + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another worker on this node finished first
            if not (target / DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def localize(path: str) -> str:
    """A local folder for ``path``: itself, or the node-local mirror of a URI."""
    return str(local_copy(path)) if is_uri(path) else path
