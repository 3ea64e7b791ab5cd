"""Unpack an uploaded zip or tar(.gz/.bz2/.xz) into a fresh folder, refusing what could escape or explode it.

The kind is read from the file's first bytes (its magic numbers), never from its name. Every entry is checked
before anything of it is written, and its bytes are counted as they are written (headers are not trusted):

- names: absolute (``/x``, ``C:x``), ``..`` anywhere, NUL bytes, or the same path twice are refused;
- kinds: symlinks, hard links, devices and FIFOs are refused (zip: the Unix mode in ``external_attr``);
  encrypted zip entries too;
- counts: more than ``max_entries`` entries (``zipfile``'s one read of the central directory is capped at
  ``max_entries`` records' worth, whatever size the end records claim, so ten million empty entries cost nothing);
  one entry over ``max_entry_bytes``; all entries over ``max_total_bytes``;
- tar extended headers (PAX, GNU long names) and sparse files are checked before ``tarfile`` parses them
  (``serving.uploads.tar_headers``: quadratic PAX parsing in Python < 3.11.10, recursion, unbounded sparse maps);
- ratio (zip bombs): uncompressed ÷ compressed over ``max_ratio`` — per entry for zip (its compressed size is
  what ``zipfile`` reads for it), over the decompressed stream so far for tar (one compressed stream: headers,
  PAX records included), checked after a grace of ``RATIO_GRACE_BYTES``. Limits and grace
  follow Apache POI's ``ZipSecureFile`` (minimum inflate ratio 0.01 = 100:1, 100 KiB grace) and OWASP's advice
  on file uploads.

Files are created with ``O_EXCL | O_NOFOLLOW`` inside a folder this module made, so nothing is overwritten and
no link is followed. On any refusal the caller removes the folder (``serving.uploads.store`` extracts into its
staging folder).
"""

from __future__ import annotations

import bz2
import errno
import gzip
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from serving.uploads.tar_headers import CheckedTarInfo, HeaderRefused

CHUNK = 1 << 20  # bytes per read/write while extracting
RATIO_GRACE_BYTES = 100 * 1024  # Apache POI ZipSecureFile.GRACE_ENTRY_SIZE: small entries may compress well
CD_ENTRY_BYTES = 1024  # a zip central-directory record: 46 fixed bytes + name/extra/comment (real ones stay far below)
EOCD_SEARCH_BYTES = 22 + 65535  # zipfile looks for the end record in the last 64 KiB + 22 bytes (APPNOTE 4.3.16)
_DRIVE = re.compile(r"^[A-Za-z]:")
_COMPRESSED_TAR = {b"\x1f\x8b": "tar.gz", b"BZh": "tar.bz2", b"\xfd7zXZ\x00": "tar.xz"}
_OPENERS = {"tar.gz": lambda f: gzip.GzipFile(fileobj=f), "tar.bz2": bz2.BZ2File, "tar.xz": lzma.LZMAFile}


class ArchiveError(ValueError):
    """An upload that is not an archive, or one this module refuses to unpack; the message says why and what to
    send instead. ``entry`` names the archive entry at fault ("" when none)."""

    def __init__(self, message: str, entry: str = ""):
        super().__init__(f"{entry}: {message}" if entry else message)
        self.entry = entry


class StorageError(RuntimeError):
    """Writing the unpacked files failed (disk full, permissions): the server's storage, not the upload."""


class NotAnArchive(ArchiveError):
    """The bytes are no zip and no tar (plain, gzip, bzip2 or xz)."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int  # entries of any kind, folders included
    max_entry_bytes: int  # uncompressed bytes of one entry
    max_total_bytes: int  # uncompressed bytes of all entries
    max_ratio: float  # uncompressed / compressed, past RATIO_GRACE_BYTES


@dataclass(frozen=True)
class Extracted:
    kind: str  # "zip", "tar", "tar.gz", "tar.bz2" or "tar.xz"
    entries: int  # entries read (files and folders)
    files: int  # regular files written
    bytes: int  # uncompressed bytes written


def detect(path: Path) -> str:
    """The archive kind of the file at ``path`` from its first 512 bytes.

    Returns:
        ``"zip"``, ``"tar"`` (POSIX/GNU ``ustar`` magic at offset 257), or ``"tar.gz"``/``"tar.bz2"``/``"tar.xz"``
        (the compressor's magic; that it holds a tar is checked when it is read).

    Raises:
        NotAnArchive: anything else, naming its first bytes.
    """
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # a local file header, or the end record of an empty zip
        return "zip"
    for magic, kind in _COMPRESSED_TAR.items():
        if head.startswith(magic):
            return kind
    if head[257:262] == b"ustar":
        return "tar"
    shown = head[:8].hex(" ") or "nothing: the file is empty"
    raise NotAnArchive(
        f"the upload is not a zip or tar archive (its first bytes are {shown}): send the images and captions as a "
        "zip, or a tar / tar.gz / tar.bz2 / tar.xz"
    )


def extract(path: Path, dest: Path, limits: ArchiveLimits) -> Extracted:
    """Unpack the archive at ``path`` into ``dest`` (created here; it must not exist) under ``limits``.

    Raises:
        NotAnArchive: see ``detect``; also a compressed file that holds no tar.
        ArchiveError: the first entry refused (name, kind, size, ratio, count) or an archive that cannot be read.
    """
    kind = detect(path)
    dest.mkdir(parents=True)
    writer = _Writer(dest, limits)
    if kind == "zip":
        _unzip(path, writer)
    else:
        _untar(path, kind, writer)
    return Extracted(kind, writer.entries, writer.files, writer.total)


def member_path(name: str) -> PurePosixPath | None:
    """The relative path an archive entry name stands for (``\\`` read as ``/``, ``.`` and empty parts dropped);
    None for the archive's root itself (``./``).

    Raises:
        ArchiveError: a NUL byte, a name that is not UTF-8, an absolute name or a ``..`` part, naming the entry.
    """
    if "\x00" in name:
        raise ArchiveError("a NUL byte in the name; rename the file", repr(name))
    try:  # a tar entry's name that is not UTF-8 comes decoded with surrogates: no JSON answer could carry it
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise ArchiveError("a name that is not UTF-8; rename the file (names are stored and shown as UTF-8)",
                           shown) from None  # fmt: skip
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise ArchiveError("an absolute path; archive the files with paths relative to the dataset folder", name)
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError("a '..' part that points outside the dataset folder; archive the folder itself", name)
    return PurePosixPath(*parts) if parts else None


class _Writer:
    """Creates folders and files under ``dest``, counting entries and the bytes actually written."""

    def __init__(self, dest: Path, limits: ArchiveLimits):
        self.dest, self.real, self.limits = dest, os.path.realpath(dest), limits
        self.entries = self.files = self.total = 0
        self.seen: set[PurePosixPath] = set()

    def entry(self, name: str) -> Path | None:
        """Count one entry; the path to create for it (None for the root), its name checked."""
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise ArchiveError(
                f"more than {self.limits.max_entries} entries (files.max_entries): a dataset is 10-1000 images with "
                "captions; remove the rest"
            )
        rel = member_path(name)
        if rel is None:
            return None
        if rel in self.seen:
            raise ArchiveError("given twice in the archive (which copy is meant is not guessable); keep one", name)
        self.seen.add(rel)
        target = self.dest / rel
        if os.path.commonpath([self.real, os.path.realpath(target.parent)]) != self.real:
            raise ArchiveError("resolves outside the dataset folder", name)
        return target

    def folder(self, target: Path, name: str) -> None:
        try:
            target.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ArchiveError("a folder where the archive also has a file of that name; rename one", name) from exc
        except OSError as exc:
            raise _os_error(exc, name) from exc

    def file(self, target: Path, name: str, src: BinaryIO, check_ratio) -> None:
        """Copy ``src`` into a new file at ``target``; ``check_ratio(written)`` runs after each chunk."""
        self.folder(target.parent, name)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except (FileExistsError, IsADirectoryError) as exc:
            raise ArchiveError("a file where the archive also has a folder of that name; rename one", name) from exc
        except OSError as exc:
            raise _os_error(exc, name) from exc
        written, lim = 0, self.limits
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                written += len(chunk)
                self.total += len(chunk)
                if written > lim.max_entry_bytes:
                    raise ArchiveError(f"larger than {lim.max_entry_bytes} bytes uncompressed (files.max_entry_bytes)",
                                       name)  # fmt: skip
                if self.total > lim.max_total_bytes:
                    raise ArchiveError(
                        f"the archive unpacks to more than {lim.max_total_bytes} bytes (files.max_extracted_bytes); "
                        "send fewer or smaller images", name,
                    )  # fmt: skip
                check_ratio(written)
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise StorageError(f"cannot write {name} under files.root: {exc.strerror or exc}") from exc
        self.files += 1

    def ratio(self, name: str, uncompressed: int, compressed: int) -> None:
        if uncompressed > RATIO_GRACE_BYTES and uncompressed > self.limits.max_ratio * max(compressed, 1):
            raise ArchiveError(
                f"unpacks to more than {self.limits.max_ratio:g} times its compressed size (files.max_ratio): "
                "refused as a zip bomb; images are compressed already and do not shrink this much", name,
            )  # fmt: skip


def _os_error(exc: OSError, name: str) -> Exception:
    """A name the file system refuses is the archive's problem (400); anything else is the server's storage (507).
    Neither message holds the server's path (``exc.strerror`` only)."""
    if exc.errno == errno.ENAMETOOLONG:
        return ArchiveError("a name too long for the file system (at most 255 bytes a part, 4096 a path); shorten "
                            "it", name[:200])  # fmt: skip
    return StorageError(f"cannot create {name[:200]} under files.root: {exc.strerror or type(exc).__name__}")


class _BoundedReads:
    """The upload file for ``zipfile.ZipFile``: while ``cap`` is set, a read of more than ``cap`` bytes is refused.
    ``zipfile`` reads the whole central directory in one read of the size its end records give (the zip64 record
    before the locator overrides the classic one; either may lie), so capping that read bounds the entries it
    parses into memory by what ``zipfile`` actually reads, not by a second parser's reading of the end records."""

    def __init__(self, f: BinaryIO, cap: int | None):
        self.f, self.cap, self.size = f, cap, os.fstat(f.fileno()).st_size

    def read(self, n: int = -1) -> bytes:
        wanted = self.size - self.f.tell() if n is None or n < 0 else n  # read() = the rest of the file
        if self.cap is not None and wanted > self.cap:
            raise _DirectoryTooLarge(wanted)
        return self.f.read(n)

    def __getattr__(self, name: str):  # seek, tell, seekable, name: the file's own
        return getattr(self.f, name)


class _DirectoryTooLarge(Exception):
    pass


class _ReadError(Exception):
    pass


def _unzip(path: Path, writer: _Writer) -> None:
    limit = writer.limits.max_entries * CD_ENTRY_BYTES
    with open(path, "rb") as f:
        bounded = _BoundedReads(f, max(limit, EOCD_SEARCH_BYTES))  # zipfile reads the end records in 64 KiB
        try:
            archive = zipfile.ZipFile(bounded)  # type: ignore[arg-type] - read, seek and tell are all it needs
        except _DirectoryTooLarge as exc:
            raise ArchiveError(
                f"its central directory is {exc.args[0]} bytes, more than {writer.limits.max_entries} entries "
                f"(files.max_entries) can take: remove files"
            ) from None
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise ArchiveError(f"the zip cannot be read ({exc}); zip the folder again") from exc
        bounded.cap = None  # the entries' data is read in chunks and counted by the writer
        with archive:
            for info in archive.infolist():
                _unzip_entry(archive, info, writer)


def _unzip_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, writer: _Writer) -> None:
    name = info.filename
    mode = info.external_attr >> 16  # Unix st_mode when the archiver was on Unix (0 from Windows tools)
    if stat.S_ISLNK(mode):
        raise ArchiveError("a symbolic link; archive the file it points to instead (zip -y stores links)", name)
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # no type bits: a plain file
        raise ArchiveError("a device, FIFO or socket, not a file; remove it", name)
    if info.flag_bits & 0x1:
        raise ArchiveError("encrypted; zip the dataset without a password", name)
    target = writer.entry(name)
    if target is None:
        return
    if info.is_dir():
        writer.folder(target, name)
        return
    try:
        try:
            src = archive.open(info)
        except OSError as exc:  # a header offset before the file's start (a lying end record): a seek refused
            raise _ReadError(exc.strerror or str(exc)) from exc
        with src:
            writer.file(target, name, src, lambda written: writer.ratio(name, written, info.compress_size))
    except (zipfile.BadZipFile, NotImplementedError, EOFError, zlib.error, _ReadError) as exc:
        raise ArchiveError(f"cannot be unpacked ({exc}); zip the folder again with deflate or store", name) from exc


class _Metered:
    """A decompressing reader that refuses past ``max_ratio`` (bytes out ÷ compressed bytes consumed so far) and
    past the total limit plus headroom for tar headers: it bounds what ``tarfile`` itself reads into memory
    (PAX records, GNU long names) as well as the members' data."""

    def __init__(self, inner: BinaryIO, raw: BinaryIO, writer: _Writer):
        self.inner, self.raw, self.writer, self.out = inner, raw, writer, 0
        self.cap = writer.limits.max_total_bytes + 512 * (writer.limits.max_entries + 2) * 3  # data + headers

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(min(n, CHUNK) if n is not None and n >= 0 else CHUNK)
        self.out += len(data)
        if self.out > self.cap:
            raise ArchiveError(
                f"the archive unpacks to more than {self.writer.limits.max_total_bytes} bytes "
                "(files.max_extracted_bytes); send fewer or smaller images"
            )
        self.writer.ratio("(the archive as a whole)", self.out, self.raw.tell())
        return data


def _untar(path: Path, kind: str, writer: _Writer) -> None:
    with open(path, "rb") as raw:
        inner = _OPENERS[kind](raw) if kind in _OPENERS else raw
        try:
            archive = tarfile.open(fileobj=_Metered(inner, raw, writer), mode="r|", tarinfo=CheckedTarInfo)  # noqa: SIM115 - `with archive` below; a stream
        except HeaderRefused as exc:
            raise ArchiveError(str(exc)) from None
        except (tarfile.TarError, OSError, EOFError, lzma.LZMAError) as exc:
            raise NotAnArchive(f"a {kind.removeprefix('tar.')} file that does not hold a tar archive ({exc}): send a "
                               "zip, or a tar / tar.gz / tar.bz2 / tar.xz") from exc  # fmt: skip
        try:
            with archive:
                for member in archive:
                    _untar_entry(archive, member, writer)
        except HeaderRefused as exc:
            raise ArchiveError(str(exc)) from None
        except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
            raise ArchiveError(f"the {kind} archive cannot be read ({exc}); pack the folder again") from exc


def _untar_entry(archive: tarfile.TarFile, member: tarfile.TarInfo, writer: _Writer) -> None:
    name = member.name
    if member.issym() or member.islnk():
        raise ArchiveError(f"a {'symbolic' if member.issym() else 'hard'} link (-> {member.linkname}); archive the "
                           "file itself (tar -h follows links)", name)  # fmt: skip
    if not (member.isreg() or member.isdir()):
        raise ArchiveError("a device, FIFO or other special file, not a file; remove it", name)
    target = writer.entry(name)
    if target is None:
        return
    if member.isdir():
        writer.folder(target, name)
        return
    src = archive.extractfile(member)
    writer.file(target, name, src, lambda written: None)  # the ratio is metered on the stream (_Metered)
