"""The SDK's uploads: a File object, and a dataset folder packed into a tar as it is sent (``Client.upload``).

    file = client.upload("data/toy-sks")           # a folder: packed on the fly, streamed, never held whole
    file = client.upload("toy-sks.zip")            # a zip or tar(.gz/.bz2/.xz): sent as it is
    file.id, file.dataset["images"], file.dataset["problems"]

A folder becomes an uncompressed POSIX (pax) tar whose entries are ``<folder name>/<path>`` for every regular file
under it (hidden files and folders, e.g. ``.DS_Store``, and symbolic links are left out). Images are compressed
already, so compressing the tar would cost CPU for little. The tar is produced in chunks of at most ``CHUNK``
bytes while the request is sent; its size is known beforehand (512-byte headers, data padded to 512, two zero
blocks: POSIX.1-2001 ``pax``), so the request carries a Content-Length and the server refuses one over
``files.max_bytes`` before a byte of it is read.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tarfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNK = 1 << 20  # bytes read from a file per piece of the request body
BLOCK = tarfile.BLOCKSIZE  # 512


@dataclass(frozen=True)
class File:
    """OpenAI's File object (same field names) plus lorafleet's ``dataset`` report (``images``, ``captions``,
    ``layout``, ``archive``, ``problems``: every problem by file)."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    dataset: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict, repr=False)  # the whole object as the server sent it

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> File:
        names = ("id", "bytes", "created_at", "filename", "purpose", "status", "status_details", "dataset")
        return cls(**{k: body.get(k) for k in names}, data=body)


@dataclass(frozen=True)
class Body:
    """A ``multipart/form-data`` request body sent in pieces: ``chunks()`` starts it over (for a retry)."""

    headers: dict[str, str]
    chunks: Callable[[], Iterator[bytes]]

    async def achunks(self) -> AsyncIterator[bytes]:
        """The same pieces for ``httpx.AsyncClient``; files are read in a worker thread."""
        pieces = self.chunks()
        while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
            yield piece


def upload_body(path: str | os.PathLike, purpose: str) -> Body:
    """The ``POST /v1/files`` body for ``path``: a folder packed into a tar, any other file sent as it is.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a folder without a file to send.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        entries = tar_entries(path)
        name, size, chunks = f"{path.resolve().name}.tar", tar_size(entries), lambda: tar_stream(entries)
    elif path.is_file():
        name, size, chunks = path.name, path.stat().st_size, lambda: _read(path, path.stat().st_size)
    else:
        raise FileNotFoundError(f"upload: {path} does not exist; pass a dataset folder or a zip/tar of one")
    return multipart({"purpose": purpose}, name, size, chunks)


def multipart(fields: dict[str, str], filename: str, size: int, chunks: Callable[[], Iterator[bytes]]) -> Body:
    """A form with text ``fields`` first, then the part ``file`` (``size`` bytes from ``chunks``), as RFC 7578
    frames it (the file name quoted as WHATWG's HTML form encoding does: ``"`` → ``%22``, line breaks escaped)."""
    boundary = secrets.token_hex(16)
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    )
    quoted = filename.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
    head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
             "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
    tail = f"\r\n--{boundary}--\r\n".encode()

    def pieces() -> Iterator[bytes]:
        yield head
        yield from chunks()
        yield tail

    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + size + len(tail)),
    }
    return Body(headers, pieces)


def tar_entries(folder: Path) -> list[tuple[Path, bytes, int]]:
    """``(file, its tar header, its size)`` for every regular, non-hidden file under ``folder``, in sorted order.

    Raises:
        ValueError: no such file.
    """
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or path.is_symlink() or not path.is_file():
                continue
            stat = path.stat()
            info = tarfile.TarInfo(f"{folder.resolve().name}/{path.relative_to(folder).as_posix()}")
            info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
            out.append((path, info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), stat.st_size))
    if not out:
        raise ValueError(f"upload: {folder} holds no file to send (hidden files and links are left out)")
    return out


def tar_size(entries: list[tuple[Path, bytes, int]]) -> int:
    """The tar's size in bytes: each header, each file padded to 512 bytes, and the two zero blocks at the end."""
    return sum(len(header) + -(-size // BLOCK) * BLOCK for _, header, size in entries) + 2 * BLOCK


def tar_stream(entries: list[tuple[Path, bytes, int]], chunk: int = CHUNK) -> Iterator[bytes]:
    """The tar of ``entries`` (``tar_entries``) in pieces of at most ``chunk`` bytes (a header is one piece).

    Raises:
        OSError: a file shrank since ``tar_entries`` measured it (the size is in its header and in Content-Length).
    """
    for path, header, size in entries:
        yield header
        yield from _read(path, size, chunk)
        if size % BLOCK:
            yield bytes(BLOCK - size % BLOCK)
    yield bytes(2 * BLOCK)


def _read(path: Path, size: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """The first ``size`` bytes of ``path`` in pieces of at most ``chunk``."""
    with open(path, "rb") as f:
        left = size
        while left:
            piece = f.read(min(chunk, left))
            if not piece:
                raise OSError(f"upload: {path} shrank to {size - left} bytes while it was being sent; upload again")
            left -= len(piece)
            yield piece
