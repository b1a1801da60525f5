"""Personal data patterns: `ingest` replaces matches with typed placeholders, `validate`
expects none to remain. One definition serves both, so they cannot disagree.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]"}

PATTERNS: dict[str, str] = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    # Needs separators between digit groups, so order numbers and ISO dates do not match.
    "phone": (
        r"(?<![\w-])(?:\+\d{1,3}[ .-]?)?"
        r"(?:\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}|\d{2,4}[ .-]\d{3,4}[ .-]?\d{3,4})(?![\w-])"
    ),
}

_COMPILED = {kind: re.compile(p) for kind, p in PATTERNS.items()}

# A necessary condition for each pattern, several times cheaper to scan for: text with no match
# here cannot match the pattern, so a caller may skip `redact` for it. Change them together.
PREFILTERS: dict[str, str] = {
    "email": "@",
    "phone": r"\d\d[ .-]\d{3}|\d\)",
}


def redact(text: str, kinds: Iterable[str]) -> tuple[str, Counter[str]]:
    """Replace every match of the given kinds with its placeholder; return text and counts."""
    counts: Counter[str] = Counter()
    for kind in kinds:
        text, n = _COMPILED[kind].subn(PLACEHOLDERS[kind], text)
        if n:
            counts[kind] += n
    return text, counts
