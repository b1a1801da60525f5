"""How a message's text is stored: the one cleaning `ingest` applies to every message.

Shared by `ingest` and by anything that must predict the record id ingest will give a text
(the feedback export deduplicates against the prepared records by id).
"""

from __future__ import annotations

import re
import unicodedata

_NEWLINE = re.compile(r"\r\n?|[\x0b\x0c\x85\u2028\u2029]")
# C0/C1 controls except tab and newline, plus invisible zero-width characters. ZWJ and ZWNJ
# (U+200D, U+200C) stay: they change meaning in emoji sequences and Persian/Indic scripts.
_INVISIBLE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u200b\u2060\ufeff]")
_TRAILING_SPACE = re.compile(r"[^\S\n]+\n")
_SPACE_RUN = re.compile(r"[^\S\n]{2,}")


def normalize_text(text: str) -> str:
    """One message as stored: controls and zero-width characters removed, newlines as `\\n`, NFC,
    runs of spaces/tabs collapsed to one space, no trailing spaces on any line, stripped."""
    # Fast paths: plain printable ASCII (most text) skips the regular expressions.
    if not (text.isascii() and text.isprintable()):
        text = _NEWLINE.sub("\n", text)
        text = _INVISIBLE.sub("", text)
        if not text.isascii():
            text = unicodedata.normalize("NFC", text)
    if "  " in text or "\t" in text or " \n" in text or not text.isascii():
        text = _TRAILING_SPACE.sub("\n", text)
        text = _SPACE_RUN.sub(" ", text)
    return text.strip()
