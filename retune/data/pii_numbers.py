"""The detectors of retune.data.pii for numbers a checksum or the standard library validates:
payment cards (issuer prefix, Luhn), IBANs (the country's length, mod 97), IP addresses
(`ipaddress`) and US social security numbers (area, group and serial rules, context words).
"""

from __future__ import annotations

import ipaddress
import re

from retune.data.pii_match import DIGIT_GROUP, PRIORITY, Match, Runs, within

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


def find_cards(text: str, candidates: re.Pattern[str], runs: Runs | None = None) -> list[Match]:
    out: list[Match] = []
    for m in within(text, candidates, runs, 13):
        groups = [(g.start() + m.start(), g.end() + m.start()) for g in DIGIT_GROUP.finditer(m[0])]
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
            out.append(Match("card", groups[i][0], groups[best][1], PRIORITY["card"]))
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


def find_ibans(text: str, candidates: re.Pattern[str], _hint: object = None) -> list[Match]:
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
            out.append(Match("iban", m.start(), end, PRIORITY["iban"]))
    return out


# ---------------------------------------------------------------------------------------------
# IP addresses: validated by the standard library.

# "version 1.2.3.4" is a four-part version number, not an address.
_VERSION_BEFORE = re.compile(r"(?i)(?<![a-z])(?:version|ver\.?|release|build|firmware|v)\s*$")


def find_ips(text: str, candidates: re.Pattern[str], _hint: object = None) -> list[Match]:
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
            out.append(Match("ip", m.start(), m.end(), PRIORITY["ip"]))
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
        out.append(Match("ip", m.start(), m.start() + end, PRIORITY["ip"]))
    return out


# ---------------------------------------------------------------------------------------------
# US social security numbers.

# The word right before the number, with no other number in between.
_SSN_CONTEXT = re.compile(r"(?i)(?:ssn|social\s+security|soc\.?\s*sec|ss\s*#)[^0-9]*$")
# Published in advertising and wallets, never issued.
_SSN_NEVER_ISSUED = {"078051120", "219099999"}


def find_ssns(text: str, candidates: re.Pattern[str], runs: Runs | None = None) -> list[Match]:
    out: list[Match] = []
    for m in within(text, candidates, runs, 9):
        digits = re.sub(r"\D", "", m[0])
        area, group, serial = digits[:3], digits[3:5], digits[5:]
        if area in ("000", "666") or area >= "900" or group == "00" or serial == "0000":
            continue
        if digits in _SSN_NEVER_ISSUED:
            continue
        # Nine bare digits are an SSN only when the text says so; otherwise an order number.
        if not m.group(1) and not _SSN_CONTEXT.search(text[max(m.start() - 40, 0) : m.start()]):
            continue
        out.append(Match("ssn", m.start(), m.end(), PRIORITY["ssn"]))
    return out
