"""The phone number detector of retune.data.pii: phonenumbers' matcher on each candidate run of
digits (not on the whole text), the country guessed from how a number is written, under a
budget of scans per text.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any

from retune.data.pii_match import DIGIT_GROUP, PRIORITY, Match, Runs, within

# Where a number is written without its country code, the country is guessed from how it is
# written. Plain digits are read as US/Canada numbers. A national number elsewhere is
# recognised by its trunk prefix ("0"; "8" in Russia) in the first list of countries, and in
# the second (whose national numbers have no trunk prefix) only when grouped exactly as that
# country writes them ("612 33 99 13" in Spain): an ungrouped run of digits there is
# indistinguishable from an order number. Numbers written with + or 00 are recognised from
# every country.
PHONE_DEFAULT_REGION = "US"
PHONE_TRUNK_REGIONS = ("GB", "DE", "FR", "NL", "BE", "AT", "CH", "SE", "IE", "AU", "NZ", "ZA",
                       "NG", "IN", "PH", "JP", "KR", "RU")  # fmt: skip
PHONE_GROUPED_REGIONS = ("ES", "PT", "IT", "PL", "MX", "BR", "AR", "CO", "CN", "SG")
# Shapes of other things: ddd-dd-dddd is how SSNs are written (an invalid one is still not a
# phone number), three or four dotted groups of up to 3 digits an IP address or a version.
_NOT_PHONE_SHAPE = re.compile(
    r"\d{3}-\d{2}-\d{4}|\d{1,3}(?:\.\d{1,3}){2,3}"
    # dates, 05.04.2023, 5/4/2023, 2023-04-05, also when a time follows ("2023-04-05 14:05")
    r"|(?:\d{1,2}([./-])\d{1,2}\1(?:19|20)\d\d|(?:19|20)\d\d([./-])\d{1,2}\2\d{1,2})(?: \d\d?:)?"
)
# A number right after these words is an id, whatever its digits.
_ID_BEFORE = re.compile(
    r"(?i)(?:(?<![a-z])(?:order|invoice|ticket|case|ref|reference|tracking|account|acct|customer"
    r"|member|sku|serial|isbn|part|item|transaction|confirmation|booking|zip|postcode|id|routing"
    r"|fedex|ups|usps|dhl)"
    r"(?:\s*(?:number|no\.?|num|id))?\s*[:#]?|#)\s*$"
)
# After an IBAN's country and check digits the digits are the account, not a phone number.
_IBAN_BEFORE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d\d(?: [A-Z0-9]{4})* $")
_TRUNK = re.compile(r"(?<![\d\-./:,])\(?[08][ (]*\d")
_ASCII_ALNUM = frozenset(string.ascii_letters + string.digits)
_GROUPED = re.compile(r"\d[ \t\u00a0().\-/]+\d")
_MARGIN = 8
# phonenumbers' matcher costs more per character the longer the text it reads (a 50 KB run of
# "1 1 1 ..." took seconds per region), so a run longer than this is read in parts where it
# lists numbers (_LIST_SEP), and a part longer than this in pieces this long, each from the
# first digit group past the middle of the one before: a number up to half a piece long lies
# whole in one of them.
_PIECE = 64
# Scans (one region's matcher over one run or piece, up to half a millisecond) per text: enough
# for a few hundred ordinary runs (no text of the benchmark corpus takes 70). A text with more
# is a table or a flood of digits; the runs left once they are spent are redacted whole, unread:
# over-redaction is the privacy-safe side, and no text can hold the CPU for long.
PHONE_SCANS_PER_TEXT = 300
_LIST_SEP = re.compile(r"\s*/\s*|\s{2,}|\.\s+|\s[\-\u2010-\u2015]\s")


@lru_cache(maxsize=1)
def _trunk_prefixes() -> tuple[tuple[str, str], ...]:
    from phonenumbers import PhoneMetadata

    out = []
    for region in PHONE_TRUNK_REGIONS:
        meta = PhoneMetadata.metadata_for_region(region)
        if meta is not None and meta.national_prefix:
            out.append((region, meta.national_prefix))
    return tuple(out)


def _skip_run(text: str, start: int, end: int) -> bool:
    """A digit run that is not a phone number whatever the digits: glued to a code, shaped like
    a date, an IP address or an SSN, or named an id by the words before it."""
    if start:
        # Glued to a code ("A1234567"; "NWS-5759-7844-09" is a serial number). ASCII only:
        # Chinese or Japanese text runs straight into a number ("电话13123456789").
        prev = text[start - 1]
        if prev in _ASCII_ALNUM or (prev == "-" and start > 1 and text[start - 2] in _ASCII_ALNUM):
            return True
        if prev == "+":  # "+48.512.847.638" is international, whatever its shape
            return False
    with_next = min(end + 1, len(text))  # a date and the hour of "14:05"
    if _NOT_PHONE_SHAPE.fullmatch(text, start, end) or _NOT_PHONE_SHAPE.fullmatch(
        text, start, with_next
    ):
        return True
    before = max(start - 40, 0)
    return bool(_ID_BEFORE.search(text, before, start) or _IBAN_BEFORE.search(text, before, start))


def _starts_with_trunk(p: Any, trunk: str) -> bool:
    return bool(p.raw_string.lstrip("(").startswith(trunk))


def _scan(window: str, region: str, leniency: Any) -> list[Any]:
    """phonenumbers' matches in `window`, read as written in `region`: the detector's one call
    into the matcher, the unit of its budget."""
    import phonenumbers

    return list(phonenumbers.PhoneNumberMatcher(window, region, leniency))


def _phone_spans(window: str, start: int, end: int) -> tuple[list[tuple[int, int]], int]:
    """Spans of the phone numbers in `window` (its candidate `window[start:end]` with some text
    either side), and how many scans that took: the default region first, then the regions its
    trunk prefix or grouping suggest, until every digit of the candidate is in a number."""
    import phonenumbers

    valid, grouped = phonenumbers.Leniency.VALID, phonenumbers.Leniency.EXACT_GROUPING
    run = window[start:end]
    passes: list[tuple[str, Any, Callable[[Any], bool]]] = [
        (PHONE_DEFAULT_REGION, valid, lambda p: True)
    ]
    if _TRUNK.search(run):
        passes += [
            (region, valid, partial(_starts_with_trunk, trunk=trunk))
            for region, trunk in _trunk_prefixes()
        ]
    if _GROUPED.search(run) and window[start - 1 : start] != "+":
        passes += [
            (region, grouped, lambda p: _GROUPED.search(p.raw_string) is not None)
            for region in PHONE_GROUPED_REGIONS
        ]
    digits = {i for i in range(start, end) if window[i].isdigit()}
    found: list[tuple[int, int]] = []
    scans = 0
    for region, leniency, accept in passes:
        scans += 1
        found.extend(
            (p.start, p.end)
            for p in _scan(window, region, leniency)
            if accept(p) and not _NOT_PHONE_SHAPE.fullmatch(window, p.start, p.end)
        )
        # Every digit of the candidate is in a number already: other countries cannot add one.
        if found and digits <= {i for s, e in found for i in range(s, e)}:
            break
    return found, scans


class _Scans:
    """`_phone_spans` for one text: at most `PHONE_SCANS_PER_TEXT` scans (plus the regions of
    the window that spends the last), and each distinct window scanned once, so that a text
    repeating itself ("1 1 1 ...", one number pasted many times) costs what one copy does."""

    def __init__(self) -> None:
        self.left = PHONE_SCANS_PER_TEXT
        self._seen: dict[tuple[str, int, int], list[tuple[int, int]]] = {}

    def spans(self, text: str, lo: int, hi: int, start: int, end: int) -> Runs | None:
        """Phone numbers in `text[lo:hi]` around the candidate `text[start:end]`; None once
        the budget is spent."""
        key = (text[lo:hi], start - lo, end - lo)
        found = self._seen.get(key)
        if found is None:
            if self.left <= 0:
                return None
            found, scans = _phone_spans(*key)
            self.left -= scans
            self._seen[key] = found
        return [(lo + s, lo + e) for s, e in found]


def _parts(text: str, start: int, end: int) -> Runs:
    """The run `text[start:end]` cut where it lists numbers ("030 1234567 / 0171 2345678"); a
    part with too few digits for a number stays with the next ("030 / 1234567 / ...")."""
    parts: Runs = []
    part = seg = start
    digits = 0
    for sep in _LIST_SEP.finditer(text, start, end):
        digits += sum(map(str.isdigit, text[seg : sep.start()]))
        seg = sep.end()
        if digits >= 7:
            parts.append((part, sep.start()))
            part, digits = seg, 0
    if parts and digits + sum(map(str.isdigit, text[seg:end])) < 7:
        parts[-1] = (parts[-1][0], end)
    else:
        parts.append((part, end))
    return parts


def _part_phones(
    text: str, lo: int, hi: int, start: int, end: int, scans: _Scans, out: Runs
) -> int | None:
    """Add to `out` the phone numbers in `text[start:end]` (a run or part of one, read with
    `text[lo:start]` and `text[end:hi]` around it), in pieces if it is longer than `_PIECE`.
    Returns where it stopped reading if `scans` ran out, else None."""
    if end - start <= _PIECE:
        found = scans.spans(text, lo, hi, start, end)
        if found is None:
            return start
        out += found
        return None
    groups = [g.span() for g in DIGIT_GROUP.finditer(text, start, end)]
    i = j = 0
    while True:
        a = groups[i][0]
        j = max(i, j)
        while j + 1 < len(groups) and groups[j + 1][1] <= a + _PIECE:
            j += 1
        b = min(groups[j][1], a + _PIECE)  # a group longer than a piece is no number: cut it
        last = j + 1 == len(groups)
        # A piece inside the part starts after the digits before it, so that the matcher starts
        # reading where a number may start, and ends after a digit group.
        found = scans.spans(
            text, lo if i == 0 else groups[i - 1][1], hi if last and b == end else b, a, b
        )
        if found is None:
            return a
        if last:
            out += found
            return None
        # A number near the end of a piece may run on past it: the next piece reads it whole,
        # from the first group past the middle of this one or past the numbers found in it.
        middle = a + _PIECE // 2
        kept = [(s, e) for s, e in found if s < middle]
        out += kept
        resume = max([middle, *(e for _, e in kept)])
        i += 1
        while i < len(groups) and groups[i][0] < resume:
            i += 1
        if i == len(groups):
            return None


def _run_phones(text: str, start: int, end: int, scans: _Scans) -> Runs:
    """Spans of the phone numbers in the digit run `text[start:end]`. A run longer than
    `_PIECE` is read in parts where it lists numbers, and in pieces of a part still longer;
    what is left of it once `scans` is spent is one span, unread."""
    parts = [(start, end)] if end - start <= _PIECE else _parts(text, start, end)
    out: Runs = []
    for k, (a, b) in enumerate(parts):
        # Some text either side (the matcher rejects digits glued to letters, and a date
        # followed by ":24:05", a time stamp), but no digits of the parts either side.
        lo = max(start - _MARGIN, 0) if k == 0 else parts[k - 1][1]
        hi = min(end + _MARGIN, len(text)) if k == len(parts) - 1 else parts[k + 1][0]
        stop = _part_phones(text, lo, hi, a, b, scans, out)
        if stop is not None:
            if sum(map(str.isdigit, text[stop:end])) >= 7:
                out.append((stop, end))
            break
    return out


def find_phones(text: str, candidates: re.Pattern[str], runs: Runs | None = None) -> list[Match]:
    scans = _Scans()
    out: list[Match] = []
    for m in within(text, candidates, runs, 7):
        start, end = m.span()
        if not _skip_run(text, start, end):
            found = _run_phones(text, start, end, scans)
            out.extend(Match("phone", s, e, PRIORITY["phone"]) for s, e in found)
    return out
