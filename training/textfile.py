"""Text files as users save them: UTF-8 with or without a byte-order mark, any line ends, stray whitespace.

Windows editors and PowerShell write UTF-8 with a BOM (``EF BB BF``) and CRLF line ends; old Mac tools
write CR alone. Every reader of user text (caption sidecars, ``metadata.jsonl``) goes through here, so a
caption reads the same whichever editor saved it. Anything that is not UTF-8 is an error naming the file,
the line and the fix; it is never guessed (a wrong guess would train on garbled captions).
"""

from __future__ import annotations

import codecs
from pathlib import Path

_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_UTF32_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)  # FF FE 00 00 starts with UTF-16 LE's BOM: test it first
_FIX = "re-save it as UTF-8 (in most editors: Save As → Encoding: UTF-8)"


class TextFileError(ValueError):
    """A text file (or one line of it) that is not UTF-8; the message names it and the fix."""


def split_lines(data: bytes) -> list[bytes]:
    """The lines of a text file's bytes, without a leading UTF-8 BOM and without their line ends.

    Line ends are LF, CRLF or CR alone (``bytes.splitlines`` splits on exactly these three, unlike
    ``str.splitlines``, which also splits inside a JSON string holding U+2028). Decode each line with
    ``decode_line`` so that one bad line does not hide the others.
    """
    return data.removeprefix(codecs.BOM_UTF8).splitlines()


def decode_line(line: bytes, where: str) -> str:
    """``line`` decoded as UTF-8.

    Raises:
        TextFileError: not UTF-8; the message names ``where`` (e.g. ``metadata.jsonl:4``), the byte and the fix.
    """
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = line[exc.start : exc.start + 1].hex()
        raise TextFileError(f"{where}: not UTF-8 text (byte 0x{byte} at column {exc.start + 1}); {_FIX}") from None


def check_encoding(data: bytes, where: str) -> None:
    """Refuse a whole file that is not UTF-8 by its shape: a UTF-32 or UTF-16 byte-order mark, or NUL bytes
    (UTF-16/32 without a BOM). One error for the file, instead of one per line.

    Raises:
        TextFileError: naming ``where``, the encoding found and the fix.
    """
    if data.startswith(_UTF32_BOMS):
        raise TextFileError(f"{where}: UTF-32 text, not UTF-8; {_FIX}")
    if data.startswith(_UTF16_BOMS):
        raise TextFileError(f"{where}: UTF-16 text (as Windows PowerShell 5 writes with `>`), not UTF-8; {_FIX}")
    if b"\x00" in data:  # UTF-16 without a BOM decodes as "valid" UTF-8 with a NUL between letters
        raise TextFileError(f"{where}: contains NUL bytes (UTF-16 or UTF-32 without a BOM, or not text); {_FIX}")


def decode_text(data: bytes, where: str) -> str:
    """A whole text file's bytes as a string: UTF-8 BOM dropped, every line end turned into ``\\n``.

    Raises:
        TextFileError: the bytes are UTF-16 or UTF-32 (as Windows PowerShell 5's ``>`` writes) or otherwise not UTF-8;
            the message names ``where``, the line and the fix.
    """
    check_encoding(data, where)
    lines = split_lines(data)
    out = [decode_line(line, f"{where} line {n}") for n, line in enumerate(lines, start=1)]
    return "\n".join(out)


def read_text_file(path: str | Path, where: str | None = None) -> str:
    """The text of the file at ``path``, read as ``decode_text`` reads bytes (``where`` names it in errors;
    default: the file name).

    Raises:
        TextFileError: not UTF-8.
        OSError: the file cannot be read.
    """
    path = Path(path)
    return decode_text(path.read_bytes(), where or path.name)
