"""A ``tarfile.TarInfo`` that refuses extended headers a dataset never needs and that hostile archives use against
``tarfile``'s own parser, before that parser reads them:

- PAX records in Python < 3.11.10 / 3.12.6 are parsed with regular expressions that backtrack quadratically on long
  runs of digits and repeated ``hdrcharset=`` (CVE-2024-6232, python/cpython#121285): a 16 KiB header of digits
  costs 0.6 s here, 1 MiB about 40 min, with the GIL held (the whole ingress replica stops). A record is checked
  for its framing (``<length> <keyword>=<value>\\n``, as the fixed CPython checks it), digit runs of at most
  ``MAX_DIGIT_RUN`` and at most one ``hdrcharset``, in linear time;
- extended headers (PAX, GNU long names) larger than ``MAX_EXTENDED_BYTES`` (tarfile reads each whole into memory),
  or more than ``MAX_EXTENDED_RUN`` in a row (tarfile recurses once per header: a chain of ~1000 is a
  ``RecursionError``);
- sparse files (old GNU ``S`` members, PAX ``GNU.sparse.*``): their maps are read into Python lists whose size the
  archive chooses (512 MB of map is ~10 GB of ints); images are never sparse.

``TarFile``'s documented extension point is its ``tarinfo`` class, and ``_proc_member`` is the method tarfile's
source names for subclasses to override.
"""

from __future__ import annotations

import re
import tarfile

MAX_EXTENDED_BYTES = 64 * 1024  # one PAX / GNU long-name header: paths and xattrs of real archives stay far below
MAX_EXTENDED_RUN = 16  # extended headers before one member (GNU tar and bsdtar write at most 3)
MAX_DIGIT_RUN = 32  # digits in a row inside a PAX header (lengths, sizes, times: at most 20)
_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
_PAX = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_LONG_DIGITS = re.compile(rb"[0-9]{%d}" % (MAX_DIGIT_RUN + 1))
_REPACK = "pack the folder again with plain `tar -czf` (GNU tar, or bsdtar with --no-xattrs), or send a zip"


class HeaderRefused(ValueError):
    """An extended tar header refused; the message says which and what to send instead."""


def check_pax(buf: bytes) -> None:
    """Raise HeaderRefused unless ``buf`` (a PAX header's data) is well-framed records, none sparse, without a digit
    run over ``MAX_DIGIT_RUN`` and with at most one ``hdrcharset``. Linear in ``len(buf)``."""
    if _LONG_DIGITS.search(buf):
        raise HeaderRefused(f"a PAX header with a run of more than {MAX_DIGIT_RUN} digits; {_REPACK}")
    if buf.count(b"hdrcharset=") > 1:
        raise HeaderRefused(f"a PAX header that sets hdrcharset more than once; {_REPACK}")
    if b"GNU.sparse." in buf:
        raise HeaderRefused(f"a sparse file (GNU.sparse PAX records): images are not sparse; {_REPACK} without -S")
    pos = 0
    while pos < len(buf) and buf[pos] != 0:
        space = buf.find(b" ", pos, pos + MAX_DIGIT_RUN + 1)
        end = pos + int(buf[pos:space]) if space > pos and buf[pos:space].isdigit() else -1
        keyword = buf[space + 1 : end - 1].partition(b"=")
        if end < pos + 5 or end > len(buf) or buf[end - 1] != 0x0A or not keyword[0] or not keyword[1]:
            raise HeaderRefused(f"a PAX header whose record at byte {pos} is not '<length> <keyword>=<value>\\n'; "
                                f"{_REPACK}")  # fmt: skip
        pos = end


class CheckedTarInfo(tarfile.TarInfo):
    """``TarInfo`` for ``tarfile.open(..., tarinfo=CheckedTarInfo)``: extended headers are checked (see the module
    docstring) before ``tarfile`` parses them. Raises HeaderRefused from the archive's iteration."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise HeaderRefused(f"{self.name}: a sparse file (GNU 'S' member): images are not sparse; {_REPACK}")
        if self.type not in _EXTENDED:
            tarfile_._lorafleet_extended_run = 0  # type: ignore[attr-defined]
            return super()._proc_member(tarfile_)
        run = getattr(tarfile_, "_lorafleet_extended_run", 0) + 1
        tarfile_._lorafleet_extended_run = run  # type: ignore[attr-defined]
        if run > MAX_EXTENDED_RUN:
            raise HeaderRefused(f"more than {MAX_EXTENDED_RUN} extended headers in a row; {_REPACK}")
        if self.size > MAX_EXTENDED_BYTES:
            raise HeaderRefused(f"an extended header (PAX or GNU long name) of {self.size} bytes, more than "
                                f"{MAX_EXTENDED_BYTES}; {_REPACK}")  # fmt: skip
        if self.type not in _PAX:
            return super()._proc_member(tarfile_)
        stream = tarfile_.fileobj
        buf = stream.read(self._block(self.size))  # what tarfile's _proc_pax reads first: read here, checked, replayed
        check_pax(buf[: self.size])
        tarfile_.fileobj = _Replay(buf, stream)
        try:
            return super()._proc_member(tarfile_)
        finally:
            tarfile_.fileobj = stream


class _Replay:
    """A stream that returns ``data`` to the first read, then reads on from ``inner``."""

    def __init__(self, data: bytes, inner):
        self.data, self.inner = data, inner

    def read(self, n: int = -1) -> bytes:
        if self.data is not None:
            data, self.data = self.data, None
            return data
        return self.inner.read(n)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
