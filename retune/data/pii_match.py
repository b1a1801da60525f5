"""What the detectors of retune.data.pii share: the `Match` each returns, the priority by which
overlapping kinds are resolved, and the search for candidates within the runs of 7+ digits
where every phone number, card and SSN lies.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

# Matches are resolved longest-evidence first: a private key block or a known key format wins
# over anything inside it, validated numbers over phone digits, entropy guesses last.
PRIORITY = {"secret": 0, "email": 1, "iban": 2, "card": 3, "ssn": 4, "ip": 5, "phone": 6}
WEAK_SECRET = 7


class Match(NamedTuple):
    kind: str
    start: int
    end: int
    priority: int = 0


Runs = list[tuple[int, int]]  # (start, end) of the 7+ digit runs of a text
DIGIT_GROUP = re.compile(r"\d+")  # a digit group of a number


def within(
    text: str, candidates: re.Pattern[str], runs: Runs | None, min_digits: int
) -> Iterator[re.Match[str]]:
    """Matches of `candidates` in the whole text, or only in the runs with enough digits."""
    if runs is None:
        yield from candidates.finditer(text)
        return
    for start, end in runs:
        if end - start >= min_digits and (
            min_digits <= 7 or sum(map(str.isdigit, text[start:end])) >= min_digits
        ):
            # Two characters more: the patterns look at what follows a number.
            yield from candidates.finditer(text, start, min(end + 2, len(text)))
