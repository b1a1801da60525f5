"""Personal data and secrets: `ingest` replaces them with typed placeholders, `validate` expects
none to remain. One detector (`find`) serves both, so they cannot disagree.

Each kind is a cheap necessary-condition prefilter, a candidate pattern and a validator: e-mail
(pattern), phone (`phonenumbers`), card (Luhn + issuer prefix), IBAN (country length + mod 97),
IP (`ipaddress`), US SSN (area/group/serial rules) and secrets (known key formats, bearer tokens,
private key blocks, credentials in assignments and URLs, long high-entropy tokens).

What is deliberately not a secret: hex strings (git SHAs, checksums) and UUIDs, which users
discuss as identifiers; a key written in hex is caught only by a known prefix or an
`api_key=`-style assignment. Certificates and public keys are not secrets either. Long random
tokens of no known format are (base64 blobs, a `Basic` credential, a crypto address included).
"""

from __future__ import annotations

import ipaddress
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache, partial
from itertools import pairwise
from typing import Any, NamedTuple

KINDS = ("email", "phone", "card", "iban", "ip", "ssn", "secret")

PLACEHOLDERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "card": "[CARD]",
    "iban": "[IBAN]",
    "ip": "[IP]",
    "ssn": "[SSN]",
    "secret": "[SECRET]",
}

WORDS = {
    "email": "an e-mail address",
    "phone": "a phone number",
    "card": "a payment card number",
    "iban": "an IBAN",
    "ip": "an IP address",
    "ssn": "a US social security number",
    "secret": "a secret (API key, token, password or private key)",
}

# Separators a phone number or card may be written with (NBSP and the Unicode dashes included).
_SEP = r"[ \t\u00a0\u2009\u202f().\-/\u2010-\u2015]"

_LATIN = r"A-Za-z0-9\u00c0-\u024f"  # letters and digits of Latin scripts, accents included
_LABEL = rf"[{_LATIN}](?:[{_LATIN}\-]*[{_LATIN}])?"  # one part of a domain name

# Candidates: every detection lies inside a match of its kind's pattern; validators decide.
# Boundaries are spelt as ASCII classes, not \b: CJK letters count as \w and would hide
# an address written straight after them ("メールはtaro@example.jp").
PATTERNS: dict[str, str] = {
    "email": (
        rf"(?<![{_LATIN}._%+\-])[{_LATIN}_%+\-](?:[{_LATIN}._%+\-]*[{_LATIN}_%+\-])?"
        # "icon@2x.png" is an image at double resolution, not an address.
        r"@(?!\dx\.(?:png|jpe?g|gif|webp|svg)(?![A-Za-z]))"
        rf"{_LABEL}(?:\.{_LABEL})*\.(?:[A-Za-z]{{2,}}|xn--[A-Za-z0-9]+)"
        r"(?![A-Za-z0-9\-]|\.[A-Za-z0-9])"
    ),
    # Seven or more digits with separators: the shortest national numbers have seven. A "+" or
    # "(" before it is in the matcher's window. (No lookbehind here: a pattern that starts with
    # one is scanned several times slower; `_phones` checks what precedes the run.)
    "phone": rf"\d(?:{_SEP}{{0,4}}\d){{6,}}",
    # Digit groups joined by single spaces or dashes; the validator looks for 13-19 digits on
    # group boundaries, so a card followed by an expiry date ("... 1111 12/27") is still found.
    # Not after "+" (a phone number) or an IBAN's country and check digits ("PT31 0128 ...").
    "card": (
        r"(?<![0-9A-Za-z.,+])(?<!\d[ \-])(?<![A-Z]{2}\d\d )\d+(?:[ \-]\d+)+(?![0-9A-Za-z])"
        r"|(?<![0-9A-Za-z.,+\-])\d{13,19}(?![0-9A-Za-z]|[.,]\d)"
    ),
    "iban": r"(?<![0-9A-Za-z])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{1,4}){3,9}(?![0-9A-Za-z])",
    "ip": (
        r"(?<![0-9A-Za-z.])(?:\d{1,3}\.){3}\d{1,3}(?![0-9A-Za-z]|\.\d)"
        # IPv6: with the "::" shorthand, or all groups written (the last two may be IPv4).
        r"|(?<![0-9A-Za-z:.])(?:[0-9A-Fa-f:.]*::[0-9A-Fa-f:.]*|(?:[0-9A-Fa-f]{1,4}:){5,7}"
        r"[0-9A-Fa-f.]+)(?:%[0-9A-Za-z]+)?(?![0-9A-Za-z])"
    ),
    "ssn": r"(?<![0-9A-Za-z\-])\d{3}([\- ]?)\d{2}\1\d{4}(?![0-9A-Za-z]|-\d)",
    "secret": "",  # several families, see _SECRET_FAMILIES; their union is set below
}

# A necessary condition for each kind, several times cheaper to scan for: text with no match
# here cannot hold that kind, so `find` skips the detector (it tests them as the faster, equal
# or narrower checks of `_GATES`). Change a pattern, change its prefilter: tests check that
# prefiltering never hides a detection.
PREFILTERS: dict[str, str] = {
    "email": "@",
    "phone": rf"\d(?:{_SEP}{{0,4}}\d){{6}}",
    "card": r"\d[ \-]\d|\d{13}",
    "iban": r"[A-Za-z]{2}\d\d",
    # An IPv6 address has "::" or at least six colons (the last groups may be an IPv4 address).
    "ip": r"\.\d{1,3}\.\d{1,3}\.\d|::|:(?:[0-9A-Fa-f]{1,4}:){4}",
    "ssn": r"\d{3}([\- ]?)\d\d\1\d{4}",
    "secret": (
        r"[A-Za-z0-9+/=_\-]{20}|-----BEGIN|://[^\s/@]*:"
        r"|(?i:bearer|passw|passphrase|pwd|secret|token|api.?key|access.?key|private.?key"
        r"|kennwort|contrase|mot de passe|senha)|パスワード"
    ),
}

# Matches are resolved longest-evidence first: a private key block or a known key format wins
# over anything inside it, validated numbers over phone digits, entropy guesses last.
_PLACEHOLDER_TEXTS = frozenset(PLACEHOLDERS.values())
_PRIORITY = {"secret": 0, "email": 1, "iban": 2, "card": 3, "ssn": 4, "ip": 5, "phone": 6}
_WEAK_SECRET = 7


class Match(NamedTuple):
    kind: str
    start: int
    end: int
    priority: int = 0


# ---------------------------------------------------------------------------------------------
# Phone numbers: phonenumbers' matcher on each candidate run, not on the whole text.

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
_DIGIT_GROUP = re.compile(r"\d+")
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


Runs = list[tuple[int, int]]  # (start, end) of the 7+ digit runs of a text


def digit_runs(text: str) -> Runs:
    """Runs of 7 or more digits (with separators): every phone number, card and SSN is in one."""
    return [m.span() for m in _RUNS.finditer(text)]


def _within(
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
    groups = [g.span() for g in _DIGIT_GROUP.finditer(text, start, end)]
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


def _phones(text: str, candidates: re.Pattern[str], runs: Runs | None = None) -> list[Match]:
    scans = _Scans()
    out: list[Match] = []
    for m in _within(text, candidates, runs, 7):
        start, end = m.span()
        if not _skip_run(text, start, end):
            found = _run_phones(text, start, end, scans)
            out.extend(Match("phone", s, e, _PRIORITY["phone"]) for s, e in found)
    return out


# ---------------------------------------------------------------------------------------------
# Payment cards: 13-19 digits on group boundaries, a known issuer prefix, Luhn.


def luhn_ok(digits: str) -> bool:
    """The Luhn check every payment card number passes (a mistyped digit fails it)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# (first digits low, high, number lengths) of the issuers: Visa, Mastercard, Amex, Discover,
# JCB, Diners Club, UnionPay, Maestro, Mir, RuPay. A Luhn-valid number outside them is an id.
_ISSUERS = (
    (4, 4, (13, 16, 19)),
    (51, 55, (16,)),
    (2221, 2720, (16,)),
    (34, 34, (15,)),
    (37, 37, (15,)),
    (6011, 6011, (16, 17, 18, 19)),
    (644, 649, (16, 17, 18, 19)),
    (65, 65, (16, 17, 18, 19)),
    (3528, 3589, (16, 17, 18, 19)),
    (300, 305, (14, 15, 16, 17, 18, 19)),
    (36, 36, (14, 15, 16, 17, 18, 19)),
    (38, 39, (16, 17, 18, 19)),
    (62, 62, (16, 17, 18, 19)),
    (50, 50, (12, 13, 14, 15, 16, 17, 18, 19)),
    (56, 69, (12, 13, 14, 15, 16, 17, 18, 19)),
    (2200, 2204, (16, 17, 18, 19)),
    (60, 60, (16,)),
    (81, 82, (16,)),
)


def _issuer_ok(d: str) -> bool:
    n = len(d)
    for low, high, lengths in _ISSUERS:
        if n in lengths and low <= int(d[: len(str(low))]) <= high:
            return True
    return False


def _card_layout(lengths: list[int]) -> bool:
    """Groups as cards print them: all digits at once, fours (the last group shorter or, for
    19 digits, longer), or Amex/Diners 4-6-5 and 4-6-4. Other groupings are ids."""
    if len(lengths) == 1:
        return True
    if lengths in ([4, 6, 5], [4, 6, 4]):
        return True
    return all(n == 4 for n in lengths[:-1]) and 1 <= lengths[-1] <= 5


def _cards(text: str, candidates: re.Pattern[str], runs: Runs | None = None) -> list[Match]:
    out: list[Match] = []
    for m in _within(text, candidates, runs, 13):
        groups = [(g.start() + m.start(), g.end() + m.start()) for g in _DIGIT_GROUP.finditer(m[0])]
        lengths = [e - s for s, e in groups]
        # A card starts the run, or follows one short group ("qty 2 4111 ...") or another card;
        # a match deeper inside a long run of groups (a 22-digit tracking number) is chance.
        starts = {0, 1} if lengths[0] <= 2 else {0}
        i = 0
        while i in starts and i < len(groups):
            best = None
            n = 0
            for j in range(i, len(groups)):
                n += lengths[j]
                if n > 19:
                    break
                if n >= 13 and _card_layout(lengths[i : j + 1]):
                    digits = "".join(text[s:e] for s, e in groups[i : j + 1])
                    if _issuer_ok(digits) and luhn_ok(digits):
                        best = j
            if best is None:
                i += 1
                continue
            out.append(Match("card", groups[i][0], groups[best][1], _PRIORITY["card"]))
            i = best + 1
            starts.add(i)
    return out


# ---------------------------------------------------------------------------------------------
# IBAN: the registry's length for the country, then ISO 7064 mod 97.

IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def iban_ok(iban: str) -> bool:
    """`iban` without spaces: known country, its length, mod 97 == 1."""
    iban = iban.upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum():
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ibans(text: str, candidates: re.Pattern[str], _hint: object = None) -> list[Match]:
    out: list[Match] = []
    for m in candidates.finditer(text):
        length = IBAN_LENGTHS.get(m[0][:2].upper())
        if length is None:
            continue
        # Take exactly the country's length of characters; the cut must fall between words,
        # so "DE89 3704 0044 0532 0130 00 is mine" stops before "is".
        taken, end = 0, m.start()
        for k in range(m.start(), m.end()):
            if text[k] != " ":
                taken += 1
                if taken == length:
                    end = k + 1
                    break
        if taken != length or (end < m.end() and text[end] != " "):
            continue
        if iban_ok(text[m.start() : end].replace(" ", "")):
            out.append(Match("iban", m.start(), end, _PRIORITY["iban"]))
    return out


# ---------------------------------------------------------------------------------------------
# IP addresses: validated by the standard library.

# "version 1.2.3.4" is a four-part version number, not an address.
_VERSION_BEFORE = re.compile(r"(?i)(?<![a-z])(?:version|ver\.?|release|build|firmware|v)\s*$")


def _ips(text: str, candidates: re.Pattern[str], _hint: object = None) -> list[Match]:
    out: list[Match] = []
    for m in candidates.finditer(text):
        s = m[0]
        if ":" not in s:
            try:
                ipaddress.IPv4Address(s)
            except ValueError:
                continue
            if _VERSION_BEFORE.search(text[max(m.start() - 12, 0) : m.start()]):
                continue
            out.append(Match("ip", m.start(), m.end(), _PRIORITY["ip"]))
            continue
        # A sentence may end right after the address ("... from 2001:db8::1.") or a colon
        # may follow it ("fe80::1: unreachable").
        end = len(s)
        while end and s[end - 1] in ".:" and not s[:end].endswith("::"):
            end -= 1
        addr = s[:end]
        groups = [g for g in re.split(r"[:.%]", addr.split("%")[0]) if g]
        # "::1" alone is loopback, nobody's address.
        if len(groups) < 2:
            continue
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            continue
        out.append(Match("ip", m.start(), m.start() + end, _PRIORITY["ip"]))
    return out


# ---------------------------------------------------------------------------------------------
# US social security numbers.

# The word right before the number, with no other number in between.
_SSN_CONTEXT = re.compile(r"(?i)(?:ssn|social\s+security|soc\.?\s*sec|ss\s*#)[^0-9]*$")
# Published in advertising and wallets, never issued.
_SSN_NEVER_ISSUED = {"078051120", "219099999"}


def _ssns(text: str, candidates: re.Pattern[str], runs: Runs | None = None) -> list[Match]:
    out: list[Match] = []
    for m in _within(text, candidates, runs, 9):
        digits = re.sub(r"\D", "", m[0])
        area, group, serial = digits[:3], digits[3:5], digits[5:]
        if area in ("000", "666") or area >= "900" or group == "00" or serial == "0000":
            continue
        if digits in _SSN_NEVER_ISSUED:
            continue
        # Nine bare digits are an SSN only when the text says so; otherwise an order number.
        if not m.group(1) and not _SSN_CONTEXT.search(text[max(m.start() - 40, 0) : m.start()]):
            continue
        out.append(Match("ssn", m.start(), m.end(), _PRIORITY["ssn"]))
    return out


# ---------------------------------------------------------------------------------------------
# Secrets.

_KEY_BEGIN = r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
_KEY_END = r"-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
# A block pasted without its END line: the key lines that follow. Possessive blanks: a token
# never starts with one, and giving them back made a long blank run quadratic.
_KEY_LINES = (
    r"(?:[ \t]*+\n?[ \t]*+(?:[A-Za-z0-9+/=]{8,}|(?:Proc-Type|DEK-Info|Comment):[^\n\x00]*))*"
)
# What an assigned value may hold; it runs to the first character outside the class.
_VALUE_CHAR = r"[^\s\"'`,;<>\[\]{}()«»“”‘’「」]"
_ASSIGNMENT_HEAD = (
    r"(?i:(?<![A-Za-z0-9])(?:api[ _\-]?key|api[_\-]?secret|secret[ _\-]?key|client[_\-]?secret"
    r"|access[ _\-]?key|access[ _\-]?token|auth[_\-]?token|refresh[_\-]?token|private[_\-]?key"
    r"|password|passwd|passphrase|pwd|token|secret|passwort|kennwort|contrase(?:ñ|n)a"
    r"|mot de passe|senha|パスワード))[\"']?[ \t]*[:=：][ \t]*[\"']?"
)

# What each family matches. `_secrets` finds the same spans without these patterns' worst
# cases: a BEGIN line with no END line after it scanned the rest of the text (quadratic over
# many BEGIN lines), and so did an assigned value holding many further assignments.
_SECRET_FAMILIES: dict[str, str] = {
    "private_key": rf"{_KEY_BEGIN}(?:[^\x00]*?{_KEY_END}|{_KEY_LINES})",
    "known_prefix": (
        r"(?<![A-Za-z0-9_\-])(?:"
        r"sk-(?:proj-|ant-|svcacct-)?[A-Za-z0-9_\-]{20,}"  # OpenAI, Anthropic
        r"|(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}|whsec_[A-Za-z0-9]{24,}"  # Stripe
        r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,}"  # GitHub
        r"|xox[abposr]-[A-Za-z0-9\-]{20,}"  # Slack
        r"|(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}"  # AWS access key id
        r"|AIza[A-Za-z0-9_\-]{35}"  # Google API key
        r"|glpat-[A-Za-z0-9_\-]{20,}"  # GitLab
        r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
        r"|npm_[A-Za-z0-9]{36}|pypi-[A-Za-z0-9_\-]{50,}"  # package registries
        r"|SG\.[A-Za-z0-9_\-]{20,}\.[A-Za-z0-9_\-]{20,}"  # SendGrid
        r"|(?:shpat|shpss|shpca)_[A-Fa-f0-9]{32}|dop_v1_[a-f0-9]{64}"  # Shopify, DigitalOcean
        r"|sq0(?:atp|csp)-[A-Za-z0-9_\-]{22,}"  # Square
        r"|eyJ[A-Za-z0-9_\-]{17,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"  # JWT
        r"|https://hooks\.slack\.com/services/[A-Za-z0-9/_\-]{20,}"
        r"|https://discord(?:app)?\.com/api/webhooks/[A-Za-z0-9/_\-]{20,}"
        r")(?![A-Za-z0-9_\-])"
    ),
    # The token only: "Authorization: Bearer [SECRET]" keeps the sentence readable.
    "bearer": (
        r"(?<![A-Za-z])(?i:bearer)[ \t]+(?P<bearer>[A-Za-z0-9._~+/\-]{16,}=*)"
        r"(?![A-Za-z0-9._~+/=\-])"
    ),
    # `password=...`, "api_key": "...", token: ...; the value only.
    "assignment": rf"{_ASSIGNMENT_HEAD}(?P<assignment>{_VALUE_CHAR}{{8,}})",
    # https://user:password@host: the password only.
    "url_credentials": r"://[^\s/@:\x00]+:(?P<url_credentials>[^\s/@\x00]{3,})@",
    # "=" only as base64 padding at the end: "KEY=Xq7L..." is a name and a token.
    "entropy": r"(?<![A-Za-z0-9+/_@\-])[A-Za-z0-9+/_\-]{20,}={0,2}(?![A-Za-z0-9+/=_@\-])",
}
_SECRET_RE = {
    k: re.compile(v)
    for k, v in _SECRET_FAMILIES.items()
    if k not in ("private_key", "assignment")  # see _private_keys, _assignments
}
PATTERNS["secret"] = "|".join(f"(?:{v})" for v in _SECRET_FAMILIES.values())
_KEY_BEGIN_RE, _KEY_END_RE, _KEY_LINES_RE = map(re.compile, (_KEY_BEGIN, _KEY_END, _KEY_LINES))
_NUL = re.compile("\x00")
# Up to the value's start, which must be followed by 8 value characters.
_ASSIGNMENT_RE = re.compile(rf"{_ASSIGNMENT_HEAD}(?={_VALUE_CHAR}{{8}})")
_VALUE_RUN = re.compile(f"{_VALUE_CHAR}*")


class _NextMatch:
    """The first match of `pattern` in `text` at or after a position, for positions that only
    grow: a search is repeated only once the position passes the last match's start, so all
    the searches together read the text about once."""

    def __init__(self, pattern: re.Pattern[str], text: str) -> None:
        self.pattern, self.text = pattern, text
        self._from = len(text) + 1  # nothing searched yet
        self._found: re.Match[str] | None = None

    def at_or_after(self, pos: int) -> re.Match[str] | None:
        found = self._found
        if self._from <= pos and (found is None or pos <= found.start()):
            return found
        self._from, self._found = pos, self.pattern.search(self.text, pos)
        return self._found


def _private_keys(text: str) -> Iterator[tuple[int, int]]:
    """Spans of `_SECRET_FAMILIES["private_key"]`: a BEGIN line up to the first END line after
    it (with no NUL between), else with the key lines that follow it."""
    ends, nuls = _NextMatch(_KEY_END_RE, text), _NextMatch(_NUL, text)
    pos = 0
    while begin := _KEY_BEGIN_RE.search(text, pos):
        end, nul = ends.at_or_after(begin.end()), nuls.at_or_after(begin.end())
        if end is not None and (nul is None or nul.start() >= end.start()):
            pos = end.end()
        else:
            lines = _KEY_LINES_RE.match(text, begin.end())
            pos = lines.end() if lines else begin.end()
        yield begin.start(), pos


_HEX = re.compile(r"[0-9A-Fa-f\-]+")  # hashes, UUIDs
_LOWER_RUN = re.compile(r"[a-z]{3,}")


def shannon_entropy(s: str) -> float:
    """Bits per character of `s`'s own character distribution."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _class_changes(s: str) -> float:
    """Share of neighbouring characters of different classes (upper, lower, digit, other)."""

    def cls(c: str) -> int:
        return 0 if c.isupper() else 1 if c.islower() else 2 if c.isdigit() else 3

    classes = [cls(c) for c in s]
    return sum(a != b for a, b in pairwise(classes)) / (len(s) - 1)


def looks_random(token: str) -> bool:
    """A long token that looks generated (a key, a password hash) rather than written.

    Random keys mix upper case, lower case and digits evenly: their character distribution is
    nearly flat (entropy above 0.8 x log2(length) bits per character, the most a string of
    that length can have when no character repeats being log2(length)) and the class changes
    every other character. Words, paths and identifiers repeat letters, change class at word
    starts only and have long lower-case runs. Hex strings (hashes) and UUIDs are identifiers,
    not secrets."""
    core = token.rstrip("=")
    n = len(core)
    if n < 20 or _HEX.fullmatch(core):
        return False
    upper = sum(c.isupper() for c in core)
    lower = sum(c.islower() for c in core)
    digits = sum(c.isdigit() for c in core)
    classes = (upper > 0) + (lower > 0) + (digits > 0)
    if not digits or classes < 2 or (classes == 2 and n < 32):
        return False
    # Written words (CamelCase identifiers): most letters in lower-case runs after a capital;
    # in a random key over 62 characters such runs are short and rare.
    if upper and lower and sum(len(r) for r in _LOWER_RUN.findall(core)) > n * 0.5:
        return False
    if _class_changes(core) < (0.3 if classes == 3 else 0.2):
        return False
    return shannon_entropy(core) >= min(0.8 * math.log2(n), 4.3)


# Placeholders, not values: YOUR_API_KEY, xxxxxxxx, ********, <your-token>, ${DB_PASSWORD},
# %(password)s. The last two are told by how the value starts: reading on to its end made a
# long value holding many assignments quadratic.
_PLACEHOLDER_WORD = re.compile(r"[A-Z_]+|(.)\1+")
_PLACEHOLDER_START = re.compile(r"(?i:your|my|the)[_\-]|[$%]")
_NOT_SECRET = ("required", "optional", "null", "none", "undefined", "changeme")


def _value_ok(text: str, start: int, end: int) -> bool:
    """`text[start:end]`, an assigned value, is worth hiding: not a placeholder ("password:
    required", YOUR_API_KEY). Reads no further into a long value than its placeholder checks."""
    if _PLACEHOLDER_START.match(text, start, end) or _PLACEHOLDER_WORD.fullmatch(text, start, end):
        return False
    if end - start >= 20:
        return True
    value = text[start:end]
    has_digit = any(c.isdigit() for c in value)
    has_alpha = any(c.isalpha() for c in value)
    has_other = any(not c.isalnum() for c in value)
    if value.lower() in _NOT_SECRET:
        return False
    return (has_alpha and (has_digit or has_other)) or (has_digit and has_other)


def _assignments(text: str) -> Iterator[tuple[int, int]]:
    """Spans of the values of `_SECRET_FAMILIES["assignment"]` worth hiding."""
    pos, run_end, kept_end = 0, -1, -1
    while a := _ASSIGNMENT_RE.search(text, pos):
        start = a.end()
        # A value runs to the end of its run of value characters; every further value that
        # starts inside the run ends there too, so each run is read once.
        if start >= run_end:
            run = _VALUE_RUN.match(text, start)
            run_end = kept_end = run.end() if run else start
            # The sentence's full stop is not part of the value.
            while kept_end > start and text[kept_end - 1] in ".,:!?":
                kept_end -= 1
        end = max(start, kept_end)
        if end - start >= 8 and _value_ok(text, start, end):
            yield start, end
            pos = run_end
        else:  # "api_key=Passwort: hunter22": the rejected value may hold the real assignment
            pos = start


def _secrets(
    text: str, _candidates: re.Pattern[str], families: tuple[str, ...] | None = None
) -> list[Match]:
    """Matches of the secret `families` (all when None)."""
    out: list[Match] = []
    strong = _PRIORITY["secret"]

    def want(name: str) -> bool:
        return families is None or name in families

    if want("private_key"):
        out.extend(Match("secret", start, end, strong) for start, end in _private_keys(text))
    if want("known_prefix"):
        out.extend(
            Match("secret", m.start(), m.end(), strong)
            for m in _SECRET_RE["known_prefix"].finditer(text)
        )
    if want("bearer"):
        for m in _SECRET_RE["bearer"].finditer(text):
            token = m["bearer"]
            classes = (
                any(c.isupper() for c in token)
                + any(c.islower() for c in token)
                + any(c.isdigit() for c in token)
            )
            if classes >= 2:  # not "Bearer YOUR_ACCESS_TOKEN"
                out.append(Match("secret", m.start("bearer"), m.end("bearer"), strong))
    if want("assignment"):
        out.extend(Match("secret", start, end, strong) for start, end in _assignments(text))
    if want("url_credentials"):
        for m in _SECRET_RE["url_credentials"].finditer(text):
            start, end = m.start("url_credentials"), m.end("url_credentials")
            out.append(Match("secret", start, end, strong))
    if want("entropy"):
        for m in _SECRET_RE["entropy"].finditer(text):
            if looks_random(m[0]):
                out.append(Match("secret", m.start(), m.end(), _WEAK_SECRET))
    return out


# ---------------------------------------------------------------------------------------------


def _emails(text: str, candidates: re.Pattern[str], _hint: object = None) -> list[Match]:
    return [
        Match("email", m.start(), m.end(), _PRIORITY["email"]) for m in candidates.finditer(text)
    ]


Detector = Callable[[str, "re.Pattern[str]", Any], list[Match]]
_DETECTORS: dict[str, Detector] = {
    "email": _emails,
    "phone": _phones,
    "card": _cards,
    "iban": _ibans,
    "ip": _ips,
    "ssn": _ssns,
    "secret": _secrets,
}  # fmt: skip

_COMPILED = {kind: re.compile(p) for kind, p in PATTERNS.items()}

# PREFILTERS as fast checks: a regular expression that starts with a letter class tries every
# position of the text, a substring test (`in`) does not. Each gate is implied by its
# PREFILTERS entry (tests check that gating never hides a match).
_RUNS = re.compile(PATTERNS["phone"])  # phone, card and SSN all lie in a run of 7+ digits
_IP4 = re.compile(r"\.\d{1,3}\.\d{1,3}\.\d")
_IP6 = re.compile(r":(?:[0-9A-Fa-f]{1,4}:){4}")
_IBAN = re.compile(r"\d\d(?<=[A-Za-z]{2}\d\d)")  # from the digits: far fewer than letters
_TOKEN20 = re.compile(r"[A-Za-z0-9+/=_\-]{20}")
_SECRET_WORDS = (
    "pass",
    "pwd",
    "secret",
    "token",
    "key",
    "kennwort",
    "contrase",
    "senha",
    "パスワード",
)


def _secret_families(text: str) -> tuple[str, ...]:
    """The secret families `text` can hold, from cheap necessary conditions."""
    families: list[str] = []
    if "-----BEGIN" in text:
        families.append("private_key")
    if "://" in text:
        families += ("url_credentials", "known_prefix")  # webhook URLs are known formats
    if _TOKEN20.search(text):
        families += ("known_prefix", "entropy")
    low = text.lower()
    if "bearer" in low:
        families.append("bearer")
    if ("=" in text or ":" in text or "：" in text) and any(w in low for w in _SECRET_WORDS):
        families.append("assignment")
    return tuple(dict.fromkeys(families))


_GATES: dict[str, Callable[[str], object]] = {
    "email": lambda text: "@" in text,
    # These three look only at the runs of 7+ digits (digit_runs), found once per text.
    "phone": lambda text: True,
    "card": lambda text: True,
    "ssn": lambda text: True,
    "iban": _IBAN.search,
    "ip": lambda text: "::" in text or _IP4.search(text) or _IP6.search(text),
    "secret": _secret_families,
}
_DIGIT_KINDS = frozenset(("phone", "card", "ssn"))


# An ISO 8601 date or date-time, alone: no kind can match inside one.
_TIMESTAMP = re.compile(
    r"\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d(?::\d\d(?:\.\d{1,9})?)?(?:Z|[+\-]\d\d:?\d\d)?)?"
)


class Redactor:
    """`find` and `redact` for a fixed set of kinds, prefilters compiled once.

    Text may hold several independent texts joined by NUL ("\\x00"): no match spans one."""

    def __init__(self, kinds: Iterable[str] = KINDS) -> None:
        kinds = tuple(dict.fromkeys(kinds))
        unknown = [k for k in kinds if k not in PLACEHOLDERS]
        if unknown:
            raise ValueError(f"unknown PII kind(s) {unknown}; known: {', '.join(KINDS)}")
        self.kinds = kinds
        self._checks = [(k, _GATES[k], _COMPILED[k], _DETECTORS[k]) for k in kinds]

    def find(self, text: str, prefilter: bool = True) -> list[Match]:
        """Non-overlapping matches in text order; where two kinds overlap the stronger wins.

        `prefilter=False` runs every detector on every text (tests compare the two)."""
        found = self._matches(text, prefilter)
        if len(found) < 2:
            return found
        found.sort(key=lambda m: (m.priority, m.start, m.start - m.end))
        # The characters the kept matches cover: one look per match, however many are kept.
        covered = bytearray(len(text))
        kept: list[Match] = []
        for m in found:
            if covered.find(1, m.start, m.end) < 0:
                kept.append(m)
                covered[m.start : m.end] = b"\x01" * (m.end - m.start)
        kept.sort(key=lambda m: m.start)
        return kept

    def kinds_in(self, text: str) -> frozenset[str]:
        """The kinds found in `text`, each exactly as `find(text, (kind,))` alone sees it (kinds
        that overlap are not resolved against each other): a per-kind check in one pass."""
        return frozenset(m.kind for m in self._matches(text))

    def _matches(self, text: str, prefilter: bool = True) -> list[Match]:
        """Every detector's matches, overlaps between kinds kept."""
        found: list[Match] = []
        runs: Runs | None = None
        for kind, gate, candidates, detect in self._checks:
            if not prefilter:
                found.extend(detect(text, candidates, None))
            elif kind in _DIGIT_KINDS:
                if runs is None:
                    runs = digit_runs(text)
                if runs:
                    found.extend(detect(text, candidates, runs))
            elif hint := gate(text):
                # The secret gate names the families worth looking for.
                found.extend(detect(text, candidates, hint))
        # A placeholder of an earlier pass ("://app:[SECRET]@host") is not found again.
        return [m for m in found if text[m.start : m.end] not in _PLACEHOLDER_TEXTS]

    def redact_many(self, texts: list[str]) -> tuple[list[str], Counter[str]]:
        """`redact` over independent texts in one call (joined by NUL: a conversation's
        messages, its extra fields); counts summed."""
        # Time stamps are common extra fields and hold nothing to redact; their digits would
        # only keep the phone, card and SSN detectors busy.
        todo = [
            i
            for i, t in enumerate(texts)
            if not (len(t) <= 35 and t[:1].isdigit() and _TIMESTAMP.fullmatch(t))
        ]
        if not todo:
            return texts, Counter()
        joined = "\x00".join(texts[i] for i in todo)
        if joined.count("\x00") != len(todo) - 1:  # a text of its own holds NUL
            results = [self.redact(t) for t in texts]
            return [t for t, _ in results], sum((c for _, c in results), Counter())
        joined, counts = self.redact(joined)
        if not counts:
            return texts, counts
        out = list(texts)
        for i, t in zip(todo, joined.split("\x00"), strict=True):
            out[i] = t
        return out, counts

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        """Replace every match with its placeholder; return the text and counts per kind.

        Repeated until nothing is found, so `find` on the result is empty (what `validate`
        checks): a number split from its neighbour by the first pass is caught by the next."""
        counts: Counter[str] = Counter()
        for _ in range(4):
            matches = self.find(text)
            if not matches:
                break
            parts: list[str] = []
            pos = 0
            for m in matches:
                parts.append(text[pos : m.start])
                parts.append(PLACEHOLDERS[m.kind])
                counts[m.kind] += 1
                pos = m.end
            parts.append(text[pos:])
            text = "".join(parts)
        return text, counts


def strings_in(value: Any) -> list[str]:
    """Every string inside a JSON-like value (dicts, lists), keys excluded, in a fixed order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


def with_strings(value: Any, strings: Iterator[str]) -> Any:
    """`value` with its strings replaced, in `strings_in` order, by the next of `strings`."""
    if isinstance(value, str):
        return next(strings)
    if isinstance(value, dict):
        return {k: with_strings(v, strings) for k, v in value.items()}
    if isinstance(value, list):
        return [with_strings(v, strings) for v in value]
    return value


@lru_cache(maxsize=32)
def _redactor(kinds: tuple[str, ...]) -> Redactor:
    return Redactor(kinds)


def find(text: str, kinds: Iterable[str] = KINDS) -> list[Match]:
    """Matches of `kinds` in `text` (see `Redactor.find`)."""
    return _redactor(tuple(kinds)).find(text)


def kinds_in(text: str, kinds: Iterable[str] = KINDS) -> frozenset[str]:
    """The `kinds` with a match in `text` (see `Redactor.kinds_in`)."""
    return _redactor(tuple(kinds)).kinds_in(text)


def redact(text: str, kinds: Iterable[str] = KINDS) -> tuple[str, Counter[str]]:
    """Replace every match of `kinds` with its placeholder; return text and counts per kind."""
    return _redactor(tuple(kinds)).redact(text)
