"""The secret detector of retune.data.pii: private key blocks, known key formats, bearer tokens,
credentials in assignments and URLs, and long tokens that look generated (high entropy).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from itertools import pairwise

from retune.data.pii_match import PRIORITY, WEAK_SECRET, Match

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

# What each family matches. `find_secrets` finds the same spans without these patterns' worst
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
# The union of the families: the candidate pattern of the kind "secret".
SECRET_PATTERN = "|".join(f"(?:{v})" for v in _SECRET_FAMILIES.values())
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


def find_secrets(
    text: str, _candidates: re.Pattern[str], families: tuple[str, ...] | None = None
) -> list[Match]:
    """Matches of the secret `families` (all when None)."""
    out: list[Match] = []
    strong = PRIORITY["secret"]

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
                out.append(Match("secret", m.start(), m.end(), WEAK_SECRET))
    return out
