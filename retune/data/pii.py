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

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import Any

from retune.data.pii_match import PRIORITY, Match, Runs
from retune.data.pii_numbers import (
    IBAN_LENGTHS,
    find_cards,
    find_ibans,
    find_ips,
    find_ssns,
    iban_ok,
    luhn_ok,
)
from retune.data.pii_phones import (
    PHONE_DEFAULT_REGION,
    PHONE_GROUPED_REGIONS,
    PHONE_SCANS_PER_TEXT,
    PHONE_TRUNK_REGIONS,
    find_phones,
)
from retune.data.pii_secrets import SECRET_PATTERN, find_secrets, looks_random, shannon_entropy

# The detectors live in pii_phones, pii_numbers and pii_secrets (what they share in pii_match);
# their public names are this module's too.
__all__ = [
    "IBAN_LENGTHS",
    "KINDS",
    "PATTERNS",
    "PHONE_DEFAULT_REGION",
    "PHONE_GROUPED_REGIONS",
    "PHONE_SCANS_PER_TEXT",
    "PHONE_TRUNK_REGIONS",
    "PLACEHOLDERS",
    "PREFILTERS",
    "WORDS",
    "Detector",
    "Match",
    "Redactor",
    "Runs",
    "digit_runs",
    "find",
    "iban_ok",
    "kinds_in",
    "looks_random",
    "luhn_ok",
    "redact",
    "shannon_entropy",
    "strings_in",
    "with_strings",
]

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
    # one is scanned several times slower; `find_phones` checks what precedes the run.)
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
    "secret": SECRET_PATTERN,  # several families, see retune.data.pii_secrets
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

_PLACEHOLDER_TEXTS = frozenset(PLACEHOLDERS.values())


def digit_runs(text: str) -> Runs:
    """Runs of 7 or more digits (with separators): every phone number, card and SSN is in one."""
    return [m.span() for m in _RUNS.finditer(text)]


def _emails(text: str, candidates: re.Pattern[str], _hint: object = None) -> list[Match]:
    return [
        Match("email", m.start(), m.end(), PRIORITY["email"]) for m in candidates.finditer(text)
    ]


Detector = Callable[[str, "re.Pattern[str]", Any], list[Match]]
_DETECTORS: dict[str, Detector] = {
    "email": _emails,
    "phone": find_phones,
    "card": find_cards,
    "iban": find_ibans,
    "ip": find_ips,
    "ssn": find_ssns,
    "secret": find_secrets,
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
        redacted, counts = self.redact(joined)
        if not counts:
            return texts, counts
        pieces = redacted.split("\x00")
        if len(pieces) != len(todo):
            # A match ran across the separator (a secret's value ends where whitespace does,
            # and NUL is not whitespace): the texts are independent, so redact each alone.
            results = [self.redact(t) for t in texts]
            return [t for t, _ in results], sum((c for _, c in results), Counter())
        out = list(texts)
        for i, t in zip(todo, pieces, strict=True):
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
