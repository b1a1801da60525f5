"""A labelled test set for PII redaction: planted items of every kind, with their spans, in
varied surroundings and languages, plus look-alikes that are not personal data.

Deterministic for a seed. Used by `benchmarks/pii.py` (`python -m benchmarks.pii`) and tests.

What is labelled a secret: keys of known formats, bearer tokens, private key blocks, values of
password/token/api_key assignments, passwords in URLs and long random tokens. What is not:
hex strings (git SHAs, checksums), UUIDs, tracking and order ids, placeholders such as
`YOUR_API_KEY`; they are look-alikes here and must survive.
"""

from __future__ import annotations

import base64
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KINDS = ("email", "phone", "card", "iban", "ip", "ssn", "secret")


@dataclass(frozen=True)
class Item:
    kind: str
    start: int
    end: int


@dataclass(frozen=True)
class Example:
    text: str
    items: tuple[Item, ...]  # planted PII; everything else in `text` is not PII
    lookalikes: tuple[str, ...]  # names of the look-alike families in the text


# A planted value: its text and where the PII lies inside it (a bearer token's token, an
# assignment's value), as (prefix, pii, suffix).
Value = tuple[str, str, str]

_B62 = string.ascii_letters + string.digits
_B64URL = _B62 + "-_"
_LOWER = string.ascii_lowercase


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


# Names with and without accents, so local parts are not ASCII only.
_FIRST = (
    "anna",
    "ben",
    "chloé",
    "david",
    "elif",
    "françois",
    "greta",
    "hiro",
    "ines",
    "jamal",
    "kofi",
    "lena",
    "mateo",
    "nadia",
    "omar",
    "priya",
    "quinn",
    "rosa",
    "sven",
    "tomás",
    "uma",
    "viktor",
    "wei",
    "xavier",
    "yara",
    "zoe",
    "jean-luc",
    "mary-ann",
)
_LAST = (
    "smith",
    "müller",
    "garcía",
    "nguyen",
    "kowalski",
    "rossi",
    "dubois",
    "tanaka",
    "okafor",
    "patel",
    "o'neil",
    "van-dijk",
    "johansson",
    "silva",
    "kim",
    "cohen",
)
_DOMAINS = ("example.com", "mail.example.co.uk", "uni-bonn.de", "company.io", "post.example.org",
            "correo.example.es", "example.fr", "sub.domain.example.net", "startup.ai",
            "example.co.jp", "example.com.br", "xn--mnchen-3ya.de", "gmail.com", "outlook.com",
            "web.de", "yahoo.co.in", "proton.me", "fastmail.fm", "example.museum")  # fmt: skip


def _email(rng: random.Random) -> Value:
    first = rng.choice(_FIRST).replace("'", "")
    last = rng.choice(_LAST).replace("'", "")
    if rng.random() < 0.5:  # many real addresses are plain ASCII
        first = first.encode("ascii", "ignore").decode()
        last = last.encode("ascii", "ignore").decode()
    local = rng.choice(
        (
            f"{first}.{last}",
            f"{first}{rng.randrange(1, 9999)}",
            f"{first[0]}{last}",
            f"{first}_{last}",
            f"{first}.{last}+{rng.choice(('shop', 'news', 'work', 'x'))}",
            f"{last}-{first}",
            f"{first}.{rng.choice(_LOWER)}.{last}",
            f"{first}{last}{rng.randrange(70, 99)}",
            f"info.{last}",
        )
    )
    addr = f"{local}@{rng.choice(_DOMAINS)}"
    if rng.random() < 0.1:
        addr = addr.upper() if rng.random() < 0.3 else addr.capitalize()
    return ("", addr, "")


_PHONE_COUNTRIES = ("US", "CA", "GB", "DE", "FR", "IT", "ES", "NL", "IN", "AU", "JP", "BR", "MX",
                    "CH", "SE", "PL", "ZA", "SG", "CN", "KR", "IE", "AT", "BE", "NG", "PH",
                    "RU", "TR", "ID", "EG", "VN", "TH", "KE", "AE")  # fmt: skip


def _phone_number(rng: random.Random, region: str) -> Any:
    import phonenumbers
    from phonenumbers import PhoneNumberType

    kind = rng.choice((PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE))
    example = phonenumbers.example_number_for_type(region, kind)
    assert example is not None, region  # every country here has both kinds
    nsn = phonenumbers.national_significant_number(example)
    keep = max(2, len(nsn) - 6)
    for _ in range(100):
        cand = nsn[:keep] + _digits(rng, len(nsn) - keep)
        num = phonenumbers.parse(f"+{example.country_code}{cand}")
        if phonenumbers.is_valid_number(num):
            return num
    return example


def _phone(rng: random.Random) -> Value:
    import phonenumbers
    from phonenumbers import PhoneNumberFormat as F

    # Most numbers in a support chat are local (US/Canada here) or written internationally.
    r = rng.random()
    region = rng.choice(("US", "CA")) if r < 0.4 else rng.choice(_PHONE_COUNTRIES)
    num = _phone_number(rng, region)
    intl = phonenumbers.format_number(num, F.INTERNATIONAL)
    national = phonenumbers.format_number(num, F.NATIONAL)
    e164 = phonenumbers.format_number(num, F.E164)
    if region in ("US", "CA"):
        nsn = phonenumbers.national_significant_number(num)
        a, b, c = nsn[:3], nsn[3:6], nsn[6:]
        text = rng.choice(
            (
                f"({a}) {b}-{c}",
                f"{a}-{b}-{c}",
                f"{a}.{b}.{c}",
                f"{a} {b} {c}",
                f"+1 ({a}) {b}-{c}",
                f"+1 {a} {b} {c}",
                f"+1-{a}-{b}-{c}",
                f"1-{a}-{b}-{c}",
                f"+1{a}{b}{c}",
                f"{a}{b}{c}",
                intl,
            )
        )
    elif r < 0.8:  # written for the world: + or 00 and the country code
        text = rng.choice(
            (
                intl,
                intl,
                e164,
                "00" + intl[1:],
                intl.replace(" ", "-"),
                intl.replace(" ", "."),
            )
        )
    else:  # written at home, in the country's national format
        text = national
    return ("", text, "")


# (first digits, length, grouping) of card brands; groupings as printed on the cards.
_CARD_BRANDS = (
    ("4", 16, (4, 4, 4, 4)),  # Visa
    ("4", 13, (4, 4, 5)),  # Visa (old)
    ("51", 16, (4, 4, 4, 4)),  # Mastercard
    ("55", 16, (4, 4, 4, 4)),
    ("2221", 16, (4, 4, 4, 4)),  # Mastercard 2-series
    ("2720", 16, (4, 4, 4, 4)),
    ("34", 15, (4, 6, 5)),  # American Express
    ("37", 15, (4, 6, 5)),
    ("6011", 16, (4, 4, 4, 4)),  # Discover
    ("65", 16, (4, 4, 4, 4)),
    ("3530", 16, (4, 4, 4, 4)),  # JCB
    ("36", 14, (4, 6, 4)),  # Diners Club
    ("62", 16, (4, 4, 4, 4)),  # UnionPay
    ("62", 19, (4, 4, 4, 4, 3)),
    ("6759", 16, (4, 4, 4, 4)),  # Maestro
)


def luhn_digit(partial: str) -> str:
    """The check digit that makes `partial` + digit pass the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def _card_digits(rng: random.Random) -> tuple[str, tuple[int, ...]]:
    prefix, length, groups = rng.choice(_CARD_BRANDS)
    body = prefix + _digits(rng, length - len(prefix) - 1)
    return body + luhn_digit(body), groups


def _group(digits: str, groups: tuple[int, ...], sep: str) -> str:
    out, pos = [], 0
    for g in groups:
        out.append(digits[pos : pos + g])
        pos += g
    return sep.join(out)


def _card(rng: random.Random) -> Value:
    digits, groups = _card_digits(rng)
    sep = rng.choice((" ", " ", "-", ""))
    return ("", _group(digits, groups, sep), "")


# Country -> BBAN layout: n digits ("n"), upper-case letters ("a"), alphanumerics ("c").
_IBAN_LAYOUTS = {
    "DE": "18n", "GB": "4a14n", "FR": "10n11c2n", "ES": "20n", "IT": "1a10n12c", "NL": "4a10n",
    "BE": "12n", "CH": "5n12c", "AT": "16n", "PL": "24n", "SE": "20n", "NO": "11n", "DK": "14n",
    "FI": "14n", "PT": "21n", "IE": "4a14n", "LU": "3n13c", "IS": "22n", "GR": "7n16c",
    "CZ": "20n", "HU": "24n", "RO": "4a16c", "TR": "5n1n16c", "SA": "2n18c", "AE": "19n",
}  # fmt: skip


def _bban(rng: random.Random, layout: str) -> str:
    out, num = [], ""
    for ch in layout:
        if ch.isdigit():
            num += ch
            continue
        n, num = int(num), ""
        alphabet = {
            "n": string.digits,
            "a": string.ascii_uppercase,
            "c": string.ascii_uppercase + string.digits,
        }[ch]
        out.append(_rand(rng, alphabet, n))
    return "".join(out)


def iban_check_digits(country: str, bban: str) -> str:
    moved = bban + country + "00"
    value = int("".join(str(int(c, 36)) for c in moved))
    return f"{98 - value % 97:02d}"


def _iban_raw(rng: random.Random) -> str:
    country = rng.choice(tuple(_IBAN_LAYOUTS))
    bban = _bban(rng, _IBAN_LAYOUTS[country])
    return country + iban_check_digits(country, bban) + bban


def _iban(rng: random.Random) -> Value:
    raw = _iban_raw(rng)
    style = rng.random()
    if style < 0.55:  # the print format: groups of four
        text = " ".join(raw[i : i + 4] for i in range(0, len(raw), 4))
    elif style < 0.95:
        text = raw
    else:
        text = raw.lower()
    return ("", text, "")


def _ipv4(rng: random.Random) -> str:
    first = rng.choice((10, 172, 192, 203, 198, 8, 34, 52, 81, 151, 213, rng.randrange(1, 224)))
    return ".".join(str(o) for o in (first, *(rng.randrange(256) for _ in range(3))))


def _ipv6(rng: random.Random) -> str:
    import ipaddress

    groups = [rng.randrange(65536) for _ in range(8)]
    style = rng.random()
    if style < 0.3:
        cut = rng.randrange(3, 7)
        groups = [0x2001, 0x0DB8, *groups[2:cut], *[0] * (8 - cut)]
        groups[-1] = rng.randrange(1, 65536)
    elif style < 0.45:
        groups[:4] = [0xFE80, 0, 0, 0]
    addr = ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups))
    if style < 0.7:
        return addr.compressed
    if style < 0.85:
        return addr.exploded
    if style < 0.95:
        return "::ffff:" + _ipv4(rng)
    return addr.compressed.upper()


def _ip(rng: random.Random) -> Value:
    return ("", _ipv6(rng) if rng.random() < 0.35 else _ipv4(rng), "")


def _ssn(rng: random.Random) -> Value:
    while True:
        area = rng.randrange(1, 900)
        if area != 666:
            break
    group, serial = rng.randrange(1, 100), rng.randrange(1, 10_000)
    parts = (f"{area:03d}", f"{group:02d}", f"{serial:04d}")
    style = rng.random()
    if style < 0.75:
        return ("", "-".join(parts), "")
    if style < 0.88:
        return ("", " ".join(parts), "")
    # Nine bare digits are an SSN when the text says so.
    return (rng.choice(("SSN ", "SSN: ", "social security number ", "SSN#")), "".join(parts), "")


def _pem(rng: random.Random) -> str:
    label = rng.choice(("RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY",
                        "ENCRYPTED PRIVATE KEY", "DSA PRIVATE KEY"))  # fmt: skip
    body = base64.b64encode(rng.randbytes(rng.randrange(120, 700))).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----"


def _jwt(rng: random.Random) -> str:
    def part(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    header = part(b'{"alg":"HS256","typ":"JWT"}')
    claims = f'{{"sub":"{rng.randrange(10**9)}","name":"{rng.choice(_FIRST)}","iat":{rng.randrange(10**9, 2 * 10**9)}}}'  # noqa: E501
    return f"{header}.{part(claims.encode())}.{part(rng.randbytes(32))}"


_PASSWORDS = ("Summer2024!", "Tr0ub4dor&3", "hunter2hunter2", "P@ssw0rd123", "Winter#2023",
              "letmein-42x", "Qwerty!9876", "correcthorsebatterystaple", "Xk9#mP2$vL",
              "dragon_1987")  # fmt: skip


def _secret(rng: random.Random) -> Value:
    family = rng.randrange(20)
    if family == 0:
        return ("", "sk-proj-" + _rand(rng, _B64URL, rng.choice((48, 64, 100))), "")
    if family == 1:
        return ("", "sk-" + _rand(rng, _B62, 48), "")
    if family == 2:
        return ("", "sk-ant-api03-" + _rand(rng, _B64URL, 93) + "AA", "")
    if family == 3:
        mode = rng.choice(("sk_live_", "sk_test_", "rk_live_", "pk_live_"))
        return ("", mode + _rand(rng, _B62, rng.choice((24, 34, 99))), "")
    if family == 4:
        return ("", rng.choice(("ghp_", "gho_", "ghs_")) + _rand(rng, _B62, 36), "")
    if family == 5:
        return ("", "github_pat_" + _rand(rng, _B62, 22) + "_" + _rand(rng, _B62, 59), "")
    if family == 6:
        return ("", f"xoxb-{_digits(rng, 12)}-{_digits(rng, 13)}-{_rand(rng, _B62, 24)}", "")
    if family == 7:
        return ("", "AKIA" + _rand(rng, string.ascii_uppercase + string.digits, 16), "")
    if family == 8:  # an AWS secret access key: 40 characters of base64
        return ("", base64.b64encode(rng.randbytes(30)).decode(), "")
    if family == 9:
        return ("", "AIza" + _rand(rng, _B64URL, 35), "")
    if family == 10:
        return ("", "glpat-" + _rand(rng, _B64URL, 20), "")
    if family == 11:
        return ("", "hf_" + _rand(rng, _B62, 34), "")
    if family == 12:
        return ("", _jwt(rng), "")
    if family == 13:
        token = _jwt(rng) if rng.random() < 0.3 else _rand(rng, _B64URL, rng.choice((32, 40, 64)))
        return (rng.choice(("Authorization: Bearer ", "Bearer ", "bearer ")), token, "")
    if family == 14:
        return ("", _pem(rng), "")
    if family == 15:
        key = rng.choice(("password", "PASSWORD", "passwd", "pwd", "Passwort", "db_password"))
        sep = rng.choice(("=", ": ", " = ", '": "', "="))
        pre = f'"{key}{sep}' if sep == '": "' else f"{key}{sep}"
        return (pre, rng.choice(_PASSWORDS), '"' if sep == '": "' else "")
    if family == 16:
        key = rng.choice(("api_key", "API_KEY", "apiKey", "client_secret", "access_token", "token"))
        return (f"{key}=", _rand(rng, _B62, rng.choice((24, 32, 40))), "")
    if family == 17:
        scheme = rng.choice(("postgres", "mysql", "https", "redis", "mongodb+srv", "amqp"))
        user = rng.choice(("admin", "app", "deploy", rng.choice(_FIRST)))
        host = rng.choice(("db.internal", "example.com", "cluster0.example.net", "localhost:5432"))
        pwd = rng.choice(_PASSWORDS).replace("@", "").replace("#", "") + str(rng.randrange(99))
        return (f"{scheme}://{user}:", pwd, f"@{host}/app")
    if family == 18:
        return (
            "",
            "https://hooks.slack.com/services/"
            f"T{_rand(rng, string.ascii_uppercase + string.digits, 8)}"
            f"/B{_rand(rng, string.ascii_uppercase + string.digits, 8)}/{_rand(rng, _B62, 24)}",
            "",
        )
    # A key of no known format: only its randomness gives it away.
    return ("", _rand(rng, _B62, rng.choice((24, 32, 40, 48, 64))), "")


GENERATORS: dict[str, Callable[[random.Random], Value]] = {
    "email": _email,
    "phone": _phone,
    "card": _card,
    "iban": _iban,
    "ip": _ip,
    "ssn": _ssn,
    "secret": _secret,
}

# Sentences in several languages; {x} is where the value goes.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "email": (
        "You can reach me at {x}.", "My email is {x} if you need it.", "Send the label to {x}",
        "Meine E-Mail-Adresse lautet {x}.", "Mon adresse e-mail : {x}", "Escríbeme a {x}, gracias.",
        "メールアドレスは{x}です。", "我的邮箱是{x}。", "Contact: Jane Doe <{x}>",
        "cc: {x}; thanks", "reply-to={x}",
    ),
    "phone": (
        "Call me at {x} if that's easier.", "My number is {x}.", "You can text me on {x}",
        "Ruf mich an unter {x}.", "Mon numéro : {x}", "Llámame al {x}, por favor.",
        "電話番号は{x}です。", "我的电话是{x}。", "Tel.: {x}", "phone={x}",
        "Best number to reach me: {x} (evenings)", "Please call back on {x} or email me.",
    ),
    "card": (
        "My card number is {x}, expiry 12/27.", "Charge it to {x} please", "card: {x}",
        "Die Kartennummer ist {x}.", "Numéro de carte {x}, merci.", "Mi tarjeta es {x}.",
        "カード番号は{x}です。", "I paid with {x} on 2024-05-01.",
        "Visa ending... actually it's {x}",
    ),
    "iban": (
        "Please refund to IBAN {x}.", "My IBAN is {x}", "IBAN: {x}, BIC DEUTDEFF",
        "Bitte überweisen Sie auf {x}.", "Mon IBAN : {x}", "Mi cuenta es {x}.",
        "Account {x} (savings)", "iban={x}",
    ),
    "ip": (
        "The camera is at {x} on my network.", "I can't reach {x} since the update.",
        "Log says: connection from {x} refused", "Die IP-Adresse lautet {x}.",
        "Adresse IP : {x}", "server={x}", "ping {x} times out", "IP {x}, port 8080",
        "Blocked request from [{x}]:443",
    ),
    "ssn": (
        "My SSN is {x}.", "Social security number: {x}", "SSN {x}, DOB 03/14/1985",
        "The form asks for my SSN, it's {x}", "ssn={x}", "Here you go: {x}",
    ),
    "secret": (
        "Here is my API key: {x}", "I set {x} in the config and it still fails.",
        "export OPENAI_API_KEY={x}", "curl -H '{x}' https://api.example.com/v1/me",
        "Mein Schlüssel ist {x}, funktioniert nicht.", "Voici ma clé : {x}",
        "The log shows {x}", "config:\n{x}\nend of config", "Is {x} still valid?",
        "`{x}`",
    ),
}  # fmt: skip

# Around a value or a sentence: punctuation next to it, brackets, quotes, line starts/ends.
_WRAPS = ("{x}", "{x}", "{x}", "({x})", '"{x}"', "'{x}'", "«{x}»", "{x}.", "{x},", "{x};",
          "{x}!", "{x}?", "\n{x}\n", "{x}\n", "*{x}*", "`{x}`", "<{x}>", "「{x}」")  # fmt: skip

_FILLER = (
    "Hi, my router keeps disconnecting.", "Thanks for the quick help!", "I ordered it last week.",
    "Hallo, mein Thermostat geht nicht.", "Bonjour, ma caméra ne s'allume plus.",
    "Hola, el timbre no funciona.", "こんにちは、スピーカーが壊れました。", "你好，我的门铃坏了。",
    "It happened again this morning.", "Can you help me with this?", "",
)  # fmt: skip


def _lookalikes(rng: random.Random) -> list[tuple[str, Callable[[], str]]]:
    """(family, maker) of strings that resemble PII but are not."""

    def bad_luhn() -> str:
        digits, groups = _card_digits(rng)
        wrong = str((int(digits[-1]) + rng.randrange(1, 10)) % 10)
        return _group(digits[:-1] + wrong, groups, rng.choice((" ", "-", "")))

    def bad_iban() -> str:
        raw = _iban_raw(rng)
        # Check digits run 02..98, one per residue mod 97: any other value is wrong.
        check = rng.choice([c for c in range(2, 99) if c != int(raw[2:4])])
        raw = f"{raw[:2]}{check:02d}{raw[4:]}"
        return " ".join(raw[i : i + 4] for i in range(0, len(raw), 4))

    def isbn13() -> str:
        body = "978" + _digits(rng, 9)
        check = (10 - sum(int(d) * (1 if i % 2 == 0 else 3) for i, d in enumerate(body)) % 10) % 10
        return f"ISBN {body[:3]}-{body[3]}-{body[4:6]}-{body[6:12]}-{check}"

    def isbn10() -> str:
        body = _digits(rng, 9)
        check = sum((10 - i) * int(d) for i, d in enumerate(body)) % 11
        c = "X" if (11 - check) % 11 == 10 else str((11 - check) % 11)
        return f"ISBN {body[0]}-{body[1:4]}-{body[4:9]}-{c}"

    def bad_ssn() -> str:
        area = rng.choice(("000", "666", f"{rng.randrange(900, 1000)}"))
        return f"{area}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10_000):04d}"

    def hexs(n: int) -> str:
        return _rand(rng, "0123456789abcdef", n)

    def uuid() -> str:
        h = hexs(32)
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"

    return [
        ("order", lambda: f"order NW-{rng.randrange(100_000, 1_000_000)}"),
        ("order", lambda: f"order #{rng.randrange(10**7, 10**8)}"),
        ("order", lambda: f"Order {rng.randrange(10**9, 10**10)}"),
        ("order", lambda: f"order {_digits(rng, 3)}-{_digits(rng, 7)}-{_digits(rng, 7)}"),
        ("invoice", lambda: f"invoice INV-{rng.randrange(2019, 2026)}-{_digits(rng, 5)}"),
        ("ticket", lambda: f"ticket {rng.randrange(10_000, 100_000)}"),
        ("case", lambda: f"case number {_digits(rng, 8)}"),
        ("date", lambda: f"2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"),
        ("date", lambda: f"{rng.randrange(1, 13):02d}/{rng.randrange(1, 29):02d}/2024"),
        ("date", lambda: f"{rng.randrange(1, 29):02d}.{rng.randrange(1, 13):02d}.2023"),
        ("time", lambda: f"{rng.randrange(24):02d}:{rng.randrange(60):02d}"),
        (
            "time",
            lambda: f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}",
        ),
        (
            "datetime",
            lambda: (
                f"2024-05-{rng.randrange(1, 29):02d} {rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"  # noqa: E501
            ),
        ),
        ("price", lambda: f"${rng.randrange(1, 3000):,}.{rng.randrange(100):02d}"),
        ("price", lambda: f"{rng.randrange(1, 3000)},{rng.randrange(100):02d} €"),
        ("price", lambda: f"1.{rng.randrange(100, 1000)},{rng.randrange(100):02d} EUR"),
        (
            "amount",
            lambda: f"{rng.randrange(1, 999)},{rng.randrange(1000):03d},{rng.randrange(1000):03d}",
        ),
        ("version", lambda: f"{rng.randrange(1, 20)}.{rng.randrange(30)}.{rng.randrange(30)}"),
        (
            "version",
            lambda: (
                f"version {rng.randrange(1, 20)}.{rng.randrange(10)}.{rng.randrange(10)}.{rng.randrange(10)}"  # noqa: E501
            ),
        ),
        (
            "version",
            lambda: (
                f"v{rng.randrange(1, 9)}.{rng.randrange(10)}.{rng.randrange(10)}.{rng.randrange(100)}"  # noqa: E501
            ),
        ),
        ("version", lambda: f"build 10.0.{rng.randrange(10_000, 30_000)}.{rng.randrange(1, 3000)}"),
        (
            "version",
            lambda: (
                f"{rng.randrange(1, 5)}.{rng.randrange(10)}.{rng.randrange(10)}-beta.{rng.randrange(10)}"  # noqa: E501
            ),
        ),
        ("tracking", lambda: f"1Z{_rand(rng, string.ascii_uppercase + string.digits, 16)}"),
        (
            "tracking",
            lambda: "9400 " + " ".join(_digits(rng, 4) for _ in range(4)) + f" {_digits(rng, 2)}",
        ),
        ("tracking", lambda: f"FedEx {_digits(rng, 4)} {_digits(rng, 4)} {_digits(rng, 4)}"),
        ("isbn", isbn13),
        ("isbn", isbn10),
        ("card_invalid", bad_luhn),
        (
            "card_invalid",
            lambda: " ".join(("9" + _digits(rng, 3), *(_digits(rng, 4) for _ in range(3)))),
        ),
        ("iban_invalid", bad_iban),
        (
            "ip_invalid",
            lambda: (
                f"{rng.randrange(256, 1000)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"  # noqa: E501
            ),
        ),
        ("ip_invalid", lambda: f"{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"),
        ("ssn_invalid", bad_ssn),
        ("zip", lambda: f"ZIP {_digits(rng, 5)}-{_digits(rng, 4)}"),
        ("sku", lambda: f"SKU {_digits(rng, 3)}-{_digits(rng, 3)}-{_digits(rng, 3)}"),
        ("serial", lambda: f"serial NWS-{_digits(rng, 4)}-{_digits(rng, 4)}-{_digits(rng, 2)}"),
        ("git_sha", lambda: f"commit {hexs(40)}"),
        ("git_sha", lambda: f"fixed in {hexs(7)}"),
        ("checksum", lambda: f"sha256:{hexs(64)}"),
        ("uuid", uuid),
        ("mac", lambda: ":".join(_rand(rng, "0123456789ABCDEF", 2) for _ in range(6))),
        ("coordinates", lambda: f"{rng.uniform(-90, 90):.4f}, {rng.uniform(-180, 180):.4f}"),
        ("ratio", lambda: f"{rng.choice(('16:9', '4:3', '21:9'))} aspect ratio"),
        ("path", lambda: f"/usr/local/lib/python3.{rng.randrange(8, 13)}/site-packages"),
        (
            "identifier",
            lambda: rng.choice(
                (
                    "getUserAccountSettingsById2",
                    "AbstractSingletonProxyFactoryBean42",
                    "test_user_login_with_valid_credentials_2",
                    "x86_64-unknown-linux-gnu",
                    "Northwind_Home_Thermostat_T200_Manual_v3",
                )
            ),
        ),
        (
            "url",
            lambda: (
                f"https://example.com/help/article/{rng.randrange(1000, 99999)}-reset-your-router"
            ),
        ),
        (
            "mention",
            lambda: (
                f"@{rng.choice(_FIRST).replace('é', 'e').replace('ç', 'c').replace('á', 'a')}_support"  # noqa: E501
            ),
        ),
        ("retina", lambda: f"icon@{rng.choice((2, 3))}x.png"),
        (
            "placeholder",
            lambda: rng.choice(
                (
                    "api_key=YOUR_API_KEY",
                    "Authorization: Bearer <token>",
                    "password: ********",
                    "token: expired",
                    "password=${DB_PASSWORD}",
                )
            ),
        ),
        (
            "phrase",
            lambda: rng.choice(
                (
                    "I reset my password yesterday",
                    "the bearer of this card",
                    "the token expires in 24 hours",
                    "Bearer token authentication",
                )
            ),
        ),
        ("percent", lambda: f"{rng.randrange(100)}.{rng.randrange(10)}%"),
        ("measure", lambda: f"{rng.randrange(100, 5000)} x {rng.randrange(100, 5000)} mm"),
    ]


def _place(rng: random.Random, kind: str) -> tuple[str, list[Item]]:
    """One sentence holding one planted value of `kind`; returns its text and item."""
    prefix, pii, suffix = GENERATORS[kind](rng)
    value = prefix + pii + suffix
    wrap = rng.choice(_WRAPS) if kind != "secret" or "\n" not in value else "{x}"
    template = rng.choice(_TEMPLATES[kind])
    marker = "\x01"
    sentence = template.format(x=wrap.format(x=marker))
    at = sentence.index(marker)
    text = sentence.replace(marker, value)
    start = at + len(prefix)
    return text, [Item(kind, start, start + len(pii))]


def generate(
    n_per_kind: int = 600, seed: int = 0, lookalike_texts: int | None = None
) -> list[Example]:
    """`n_per_kind` planted items of every kind (each in its own sentence, with filler and
    look-alikes around it in a third of the texts), plus `lookalike_texts` texts of
    look-alikes only (default: as many as items of one kind)."""
    rng = random.Random(seed)
    makers = _lookalikes(rng)
    examples: list[Example] = []
    order = [k for k in KINDS for _ in range(n_per_kind)]
    rng.shuffle(order)
    for kind in order:
        text, items = _place(rng, kind)
        families: list[str] = []
        if rng.random() < 0.35:
            family, make = rng.choice(makers)
            families.append(family)
            extra = f"Also, {make()}."
            if rng.random() < 0.5:
                shift = len(extra) + 1
                text = extra + " " + text
                items = [Item(i.kind, i.start + shift, i.end + shift) for i in items]
            else:
                text = text + " " + extra
        filler = rng.choice(_FILLER)
        if filler and rng.random() < 0.5:
            shift = len(filler) + 1
            text = filler + " " + text
            items = [Item(i.kind, i.start + shift, i.end + shift) for i in items]
        examples.append(Example(text, tuple(items), tuple(families)))
    for _ in range(n_per_kind if lookalike_texts is None else lookalike_texts):
        picks = [rng.choice(makers) for _ in range(rng.randrange(1, 4))]
        parts = [rng.choice(("Ref:", "See", "About", "Re:", "My", "Note:", "FYI")) + " " + make()
                 for _, make in picks]  # fmt: skip
        text = rng.choice(_FILLER) + " " + "; ".join(parts) + rng.choice((".", "", "!", "\n"))
        examples.append(Example(text.strip(), (), tuple(f for f, _ in picks)))
    return examples
