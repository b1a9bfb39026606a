"""Decode a user's text file: UTF-8 with or without a byte-order mark, UTF-16/32 with one, or the encoding
the user names; anything else is a located error (file, line, byte offset), never a UnicodeDecodeError."""

from __future__ import annotations

import codecs

from .errors import TunesmithError

# UTF-32 LE's mark begins with UTF-16 LE's, so it is tried first.
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def detect(raw: bytes) -> str:
    """The encoding a byte-order mark announces, else utf-8."""
    return next((name for bom, name in BOMS if raw.startswith(bom)), "utf-8")


def decode(raw: bytes, where: str, encoding: str | None = None, *, error: type[TunesmithError] = TunesmithError,
           hint: str = "save the file as UTF-8") -> str:
    """`raw` as text; `where` names the file in errors. A NUL character means a binary file, not text."""
    name = encoding or detect(raw)
    try:
        text = raw.decode(name)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise error(f"not {name} text: the byte at offset {e.start} (0x{raw[e.start]:02x}) cannot be decoded",
                    where=f"{where}:{line}", hint=hint) from None
    except LookupError:
        raise error(f"unknown encoding {encoding!r}", where=where, hint="name a Python codec, e.g. cp1252") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise error("binary data (a NUL character), not a text file", where=f"{where}:{line}", hint=hint)
    return text
