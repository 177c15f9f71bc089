"""Reading user text files (prompt files): UTF-8, with or without a byte-order mark, or UTF-16/32 with one.

Editors on Windows save "Unicode" text as UTF-16 with a BOM; read as UTF-8 it is garbage or an
exception. The BOM says which encoding it is, so those files are decoded correctly. Anything else must
be UTF-8; an invalid byte is an error naming the file and the byte offset.
"""

from __future__ import annotations

import codecs
import os

from tsumugi.errors import UserError
from tsumugi.preflight.paths import require_file

# Longest first: the UTF-32-LE BOM starts with the UTF-16-LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)


def decode_text(data: bytes, path: str | os.PathLike[str], flag: str) -> str:
    """``data`` decoded by its BOM (UTF-8/16/32), else as UTF-8; the BOM itself is dropped."""
    encoding, name, start = "utf-8", "UTF-8", 0
    for bom, codec, label in _BOMS:
        if data.startswith(bom):
            encoding, name, start = codec, label, len(bom)
            break
    try:
        return data[start:].decode(encoding)
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        bad = data[offset:offset + 1].hex()
        hint = "" if start else "; save it as UTF-8 (or UTF-16 with a byte-order mark)"
        raise UserError(f"{flag}: {path} is not valid {name} text (byte 0x{bad} at offset {offset}: "
                        f"{exc.reason}){hint}") from None


def read_text(path: str | os.PathLike[str], flag: str, what: str = "text file") -> str:
    """The text of a regular file (see :func:`decode_text`); FIFOs and folders are refused unopened."""
    p = require_file(path, flag, what)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UserError(f"{flag}: cannot read {p} ({exc.strerror or exc})") from None
    return decode_text(data, p, flag)


def numbered_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) as an editor counts lines: ``\\n``, ``\\r\\n`` or ``\\r`` end a line."""
    return list(enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1))


__all__ = ["decode_text", "numbered_lines", "read_text"]
