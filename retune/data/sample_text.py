"""The text of the sample corpus (`retune sample`): a fictional smart-home maker, Northwind
Home, and its customer support. The templates are data, `sample_text.yaml` beside this file,
loaded once on import; the functions here fill them into conversations, FAQ pairs and
knowledge-base articles, and plant the content defects (personal data, blank or overlong
messages, unknown speakers, abuse, near-duplicates, other languages).

Used by `tasks.sample`, which lays the units out in files. Every choice is drawn from the
`random.Random` passed in, in a fixed order: the same seed gives the same text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_TEMPLATES = Path(__file__).with_name("sample_text.yaml")

_OVERLONG_MIN_CHARS = 4_100  # just past the default ingest.max_message_chars (4,000)
_PAIR_COUNTS = (1, 2, 3, 4)  # user/assistant exchanges: 2 to 8 messages
_PAIR_WEIGHTS = (20, 40, 28, 12)
_SYSTEM_RATE = 0.25
_AGENT_ABUSE_RATE = 0.25  # planted abuse from the agent rather than the customer
_COMPLAINT_RATE = 0.04  # clean conversations whose customer is angry but not abusive
_LOOKALIKE_RATE = 0.05


@dataclass(frozen=True)
class _Issue:
    problems: tuple[str, ...]
    resolutions: tuple[str, ...]


@dataclass(frozen=True)
class _Category:
    issues: tuple[_Issue, ...]
    asks: tuple[str, ...]
    details: tuple[str, ...]  # each names an order or case number, so conversations differ
    followups: tuple[tuple[str, str], ...]
    article: tuple[str, tuple[str, ...]]  # title, body lines


def _category(c: dict[str, Any]) -> _Category:
    return _Category(
        issues=tuple(_Issue(tuple(i["problems"]), tuple(i["resolutions"])) for i in c["issues"]),
        asks=tuple(c["asks"]),
        details=tuple(c["details"]),
        followups=tuple((f["question"], f["answer"]) for f in c["followups"]),
        article=(c["article"]["title"], tuple(c["article"]["body"])),
    )


def _load() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML has it
    templates: dict[str, Any] = yaml.load(_TEMPLATES.read_text(encoding="utf-8"), Loader=loader)
    return templates


_T = _load()


def _strings(key: str) -> tuple[str, ...]:
    return tuple(_T[key])


_PRODUCTS: dict[str, dict[str, Any]] = {
    key: {k: tuple(v) if isinstance(v, list) else v for k, v in p.items()}
    for key, p in _T["products"].items()
}
_PRODUCT_KEYS = tuple(_PRODUCTS)
_FIRST = _strings("first_names")
_LAST = _strings("last_names")
_AGENTS = _strings("agents")
_CARRIERS = _strings("carriers")
_PLANS = tuple((p["name"], p["price"]) for p in _T["plans"])
_MONTHS = _strings("months")
_EMAIL_DOMAINS = _strings("email_domains")
_CATEGORIES = {key: _category(c) for key, c in _T["categories"].items()}
CATEGORY_KEYS = tuple(_CATEGORIES)
_SYSTEM = _strings("system_prompts")
_GREETINGS = _strings("greetings")
_OPENERS = _strings("openers")
_DETAIL_LEADS = _strings("detail_leads")
_ACKS = _strings("acks")
_THANKS = _strings("thanks")
_GOODBYES = _strings("goodbyes")
_EMAIL_SENTENCES = _strings("email_sentences")
_PHONE_SENTENCES = _strings("phone_sentences")
_LOOKALIKE_SENTENCES = _strings("lookalike_sentences")
_UNKNOWN_ROLES = tuple((r["role"], r["note"]) for r in _T["unknown_roles"])
BLANKS = _strings("blanks")
ABUSE_USER = _strings("abuse_user")  # abuse hygiene must quarantine
ABUSE_AGENT = _strings("abuse_agent")
COMPLAINTS = _strings("complaints")  # angry, not abusive: hygiene keeps them
_SYNONYMS: dict[str, str] = dict(_T["synonyms"])
_ADDED_GREETINGS = _strings("added_greetings")
FOREIGN = {lang: (f["category"], tuple(f["turns"])) for lang, f in _T["foreign"].items()}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def slots(rng: random.Random) -> tuple[str, dict[str, str]]:
    """Pick a product and every value a template may name; returns (product line, slots)."""
    key = rng.choice(_PRODUCT_KEYS)
    p = _PRODUCTS[key]
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    month, day = rng.randrange(12), rng.randrange(1, 29)
    plan, plan_price = rng.choice(_PLANS)
    m = rng.randrange(2)
    s = {
        "first": first,
        "name": f"{first} {last}",
        "last": last,
        "agent": rng.choice(_AGENTS),
        "product": p["product"],
        "noun": p["noun"],
        "model": p["models"][m],
        "price": p["prices"][m],
        "reset": p["reset"],
        "pair": p["pair"],
        "fix": p["fix"],
        "symptom": rng.choice(p["symptoms"]),
        "order": f"NW-{rng.randrange(100_000, 1_000_000)}",
        "case": str(rng.randrange(10_000, 100_000)),
        "date": f"{_MONTHS[month]} {day}",
        "iso_date": f"2024-{month + 1:02d}-{day:02d}",
        "days": rng.choice(("3", "5", "7")),
        "carrier": rng.choice(_CARRIERS),
        "tracking": f"1Z{rng.randrange(10**15):015d}",
        "last4": f"{rng.randrange(10_000):04d}",
        "plan": plan,
        "plan_price": plan_price,
        "fw": f"{rng.randrange(3, 6)}.{rng.randrange(10)}.{rng.randrange(1, 20)}",
        "fw_old": f"{rng.randrange(1, 3)}.{rng.randrange(10)}.{rng.randrange(1, 20)}",
    }
    s["pair_cap"] = _cap(s["pair"])
    return key, s


def join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def conversation(rng: random.Random, category: str, s: dict[str, str]) -> list[list[Any]]:
    """A clean support conversation: optional system turn, then 1-4 user/assistant exchanges."""
    cat = _CATEGORIES[category]
    issue = rng.choice(cat.issues)
    msgs: list[list[Any]] = []
    if rng.random() < _SYSTEM_RATE:
        msgs.append(["system", rng.choice(_SYSTEM)])
    pairs = rng.choices(_PAIR_COUNTS, _PAIR_WEIGHTS)[0]
    greeting = rng.choice(_GREETINGS).format_map(s)
    problem = rng.choice(issue.problems).format_map(s)
    detail = rng.choice(cat.details).format_map(s)
    resolution = rng.choice(issue.resolutions).format_map(s)
    opener = rng.choice(_OPENERS).format_map(s)
    if pairs == 1:
        msgs.append(["user", join(greeting, problem, detail)])
        msgs.append(["assistant", join(opener, resolution)])
        return msgs
    msgs.append(["user", join(greeting, problem)])
    msgs.append(["assistant", join(opener, rng.choice(cat.asks).format_map(s))])
    msgs.append(["user", rng.choice(_DETAIL_LEADS) + detail])
    msgs.append(["assistant", join(rng.choice(_ACKS).format_map(s), resolution)])
    if pairs >= 3 and (pairs == 4 or rng.random() < 0.6):
        question, answer = rng.choice(cat.followups)
        msgs.append(["user", question.format_map(s)])
        msgs.append(["assistant", answer.format_map(s)])
    if len(msgs) - (msgs[0][0] == "system") < pairs * 2:
        msgs.append(["user", rng.choice(_THANKS)])
        msgs.append(["assistant", rng.choice(_GOODBYES).format_map(s)])
    return msgs


def faq_pair(rng: random.Random, category: str, s: dict[str, str]) -> tuple[str, str]:
    """A single-turn FAQ pair: a customer question with context, and the answer."""
    cat = _CATEGORIES[category]
    issue = rng.choice(cat.issues)
    prompt = join(rng.choice(issue.problems), rng.choice(cat.details)).format_map(s)
    return prompt, rng.choice(issue.resolutions).format_map(s)


def article(rng: random.Random, category: str, s: dict[str, str], number: int) -> str:
    """A knowledge-base article: title, an id line (unique), then body lines, no blank line."""
    title, body = _CATEGORIES[category].article
    lines = [title.format_map(s), f"Article KB-{10_000 + number} | Updated {s['iso_date']}"]
    lines += [line.format_map(s) for i, line in enumerate(body) if i == 0 or rng.random() < 0.85]
    return "\n".join(lines)


def _log_paste(rng: random.Random, s: dict[str, str]) -> str:
    """A diagnostic log a customer pastes: long, but with no digit groups that look like PII."""
    lines = ["Here is the full diagnostic log from the app:"]
    size, t = len(lines[0]), rng.randrange(86_400)
    target = rng.randrange(_OVERLONG_MIN_CHARS, 6_500)
    events = (
        "wifi: reconnect attempt {n} rssi=-{r}",
        "cloud: heartbeat missed seq={q}",
        "ota: download chunk {n}/{c} ok",
        "sensor: reading {r}.{n} C",
        "zigbee: retry in {n}s",
    )
    while size < target:
        t += rng.randrange(1, 90)
        event = rng.choice(events).format(
            n=rng.randrange(1, 40),
            r=rng.randrange(40, 90),
            q=rng.randrange(10**6),
            c=rng.randrange(40, 99),
        )
        line = (
            f"{s['iso_date']}T{t // 3600 % 24:02d}:{t // 60 % 60:02d}:{t % 60:02d}Z "
            f"{s['model']} {event}"
        )
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def long_article(rng: random.Random, s: dict[str, str], number: int) -> str:
    """A troubleshooting guide past the message size limit (still no blank lines)."""
    steps = [
        line
        for cat in ("setup", "connectivity", "hardware", "firmware")
        for line in _CATEGORIES[cat].article[1]
    ]
    lines = [
        f"Complete troubleshooting guide for the {s['product']} ({s['model']})",
        f"Article KB-{10_000 + number} | Updated {s['iso_date']}",
    ]
    size, target = 0, rng.randrange(_OVERLONG_MIN_CHARS, 7_000)
    while size < target:
        step = rng.choice(steps).format_map(s).lstrip("0123456789. ")
        line = f"Step {len(lines) - 1}: {_cap(step)}"
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def _email(rng: random.Random, s: dict[str, str]) -> str:
    first, last = s["first"].lower(), s["last"].lower()
    local = rng.choice(
        (
            f"{first}.{last}",
            f"{first}{rng.randrange(10, 99)}",
            f"{first[0]}{last}",
            f"{first}_{last}",
        )
    )
    # Names such as "Zoë" would make a local part the pattern set cannot see as an address.
    local = local.encode("ascii", "ignore").decode()
    return f"{local}@{rng.choice(_EMAIL_DOMAINS)}"


def _phone(rng: random.Random) -> str:
    area, line = rng.choice(("415", "212", "312", "646", "503")), rng.randrange(100, 200)
    return rng.choice(
        (
            f"+1 ({area}) 555-{line:04d}",
            f"{area}-555-{line:04d}",
            f"+44 20 7946 {line:04d}",
            f"({area}) 555 {line:04d}",
            f"{area}.555.{line:04d}",
            f"+1 {area} 555 {line:04d}",
        )
    )


def _luhn_digit(digits: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str(-total % 10)


def _sensitive(rng: random.Random) -> str:
    """A sentence with one valid card number, IBAN, IP address, US SSN or API key."""
    kind = rng.choice(("card", "iban", "ip", "ssn", "secret"))
    if kind == "card":
        body = "4" + "".join(rng.choice("0123456789") for _ in range(14))
        number = body + _luhn_digit(body)
        sep = rng.choice((" ", "-", ""))
        value = sep.join(number[i : i + 4] for i in range(0, 16, 4))
        sentence = rng.choice(("My card number is {v}.", "Please charge the card {v} instead."))
        return sentence.format(v=value)
    if kind == "iban":
        bban = "".join(rng.choice("0123456789") for _ in range(18))
        check = 98 - int(bban + "131400") % 97  # "DE00" with D=13, E=14, moved to the end
        iban = f"DE{check:02d}{bban}"
        value = " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))
        return f"Please refund it to my IBAN {value}."
    if kind == "ip":
        value = rng.choice(
            (f"203.0.113.{rng.randrange(1, 255)}", f"2001:db8::{rng.randrange(1, 65535):x}")
        )
        return f"My router's public IP address is {value}, if that helps."
    if kind == "ssn":
        area = rng.choice([a for a in range(100, 666) if a != 666])
        value = f"{area}-{rng.randrange(10, 100)}-{rng.randrange(1000, 10_000)}"
        return f"The form asked for my SSN, it is {value}."
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
    token = "".join(rng.choice(alphabet) for _ in range(32))
    return f"Here is the API key of my integration: sk_live_{token}"


def _lookalike(rng: random.Random, s: dict[str, str]) -> str:
    a, b, c = rng.randrange(1000, 10_000), rng.randrange(1000, 10_000), rng.randrange(10, 99)
    serial = f"NWS-{a}-{b}-{c}"
    return rng.choice(_LOOKALIKE_SENTENCES).format_map(
        {**s, "serial": serial, "qty": str(rng.randrange(2, 5))}
    )


def clean_extras(rng: random.Random, msgs: list[list[Any]], s: dict[str, str]) -> tuple[int, int]:
    """A clean conversation's harmless extras, in place: now and then an angry but civil
    customer, or order numbers, dates and serials that look like personal data but are not.
    Returns (1 if a complaint was added, 1 if a look-alike was)."""
    complaint = lookalike = 0
    if rng.random() < _COMPLAINT_RATE:
        i = user_indices(msgs)[0]
        msgs[i][1] = join(rng.choice(COMPLAINTS), msgs[i][1])
        complaint = 1
    if rng.random() < _LOOKALIKE_RATE:
        i = rng.choice(user_indices(msgs))
        msgs[i][1] = join(msgs[i][1], _lookalike(rng, s))
        lookalike = 1
    return complaint, lookalike


def user_indices(msgs: list[list[Any]]) -> list[int]:
    return [i for i, m in enumerate(msgs) if m[0] == "user"]


def plant(
    rng: random.Random, kind: str, msgs: list[list[Any]], s: dict[str, str], chat: bool
) -> bool:
    """Apply one content defect to a clean conversation in place; True means the chat line
    must also lose its "messages" key (a missing field only JSON lines can have)."""
    users = user_indices(msgs)
    if kind == "email":
        i = rng.choice(users)
        msgs[i][1] = join(msgs[i][1], rng.choice(_EMAIL_SENTENCES).format(email=_email(rng, s)))
    elif kind == "phone":
        i = rng.choice(users)
        msgs[i][1] = join(msgs[i][1], rng.choice(_PHONE_SENTENCES).format(phone=_phone(rng)))
    elif kind == "sensitive":
        i = rng.choice(users)
        msgs[i][1] = join(msgs[i][1], _sensitive(rng))
    elif kind == "overlong":
        i = rng.choice(users)
        msgs[i][1] = msgs[i][1] + "\n" + _log_paste(rng, s)
    elif kind == "empty_turn":
        i = rng.choice([j for j, m in enumerate(msgs) if m[0] != "system"])
        msgs[i][1] = rng.choice(BLANKS)
    elif kind == "unknown_role":
        role, note = rng.choice(_UNKNOWN_ROLES)
        msgs.insert(rng.randrange(1, len(msgs) + 1), [role, note])
    elif kind == "missing_field":
        # Chat lines lose a message's role or content or the whole list; table rows, the role.
        field = rng.randrange(3) if chat else 0
        if field == 2:
            return True
        msgs[rng.randrange(len(msgs))][field] = None
    return False


def _swap_word(rng: random.Random, text: str) -> str:
    """One word replaced by a synonym, or one filler word added where none applies."""
    tokens = text.split(" ")
    known = [i for i, t in enumerate(tokens) if t.strip(".,!?") in _SYNONYMS]
    if known:
        i = rng.choice(known)
        core = tokens[i].strip(".,!?")
        tokens[i] = tokens[i].replace(core, _SYNONYMS[core], 1)
    else:
        tokens.insert(rng.randrange(1, len(tokens) + 1), "just")
    return " ".join(tokens)


def paraphrase(rng: random.Random, msgs: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """A near-duplicate of a conversation: one to three small edits (a changed word,
    punctuation, a lowercased message, a greeting added), never identical to the original."""
    out = [list(m) for m in msgs]
    spoken = [i for i, m in enumerate(out) if m[0] != "system"]
    users = user_indices(out)
    for edit in rng.sample(("word", "punctuation", "casing", "greeting"), rng.randint(1, 3)):
        if edit == "word":
            i = rng.choice(spoken)
            out[i][1] = _swap_word(rng, out[i][1])
        elif edit == "punctuation":
            i = rng.choice(spoken)
            text = out[i][1]
            out[i][1] = rng.choice(
                (text.replace(",", ""), text.replace(". ", "... ", 1), text.rstrip(".!?") + "!")
            )
        elif edit == "casing":
            i = rng.choice(users)
            out[i][1] = out[i][1].lower()
        else:
            out[users[0]][1] = join(rng.choice(_ADDED_GREETINGS), out[users[0]][1])
    if out == [list(m) for m in msgs]:  # every edit happened to change nothing
        out[users[0]][1] = join(rng.choice(_ADDED_GREETINGS), out[users[0]][1])
    return out


def abuse(rng: random.Random, msgs: list[list[Any]]) -> None:
    """Make one message abusive: mostly the customer's, sometimes the agent's."""
    agents = [i for i, m in enumerate(msgs) if m[0] == "assistant"]
    if agents and rng.random() < _AGENT_ABUSE_RATE:
        i = rng.choice(agents)
        msgs[i][1] = join(rng.choice(ABUSE_AGENT), msgs[i][1])
    else:
        i = rng.choice(user_indices(msgs))
        insult = rng.choice(ABUSE_USER)
        msgs[i][1] = join(insult, msgs[i][1]) if rng.random() < 0.5 else join(msgs[i][1], insult)


def foreign(rng: random.Random, s: dict[str, str]) -> tuple[str, list[list[Any]]]:
    """A short support conversation in another language; returns (category, messages)."""
    category, turns = FOREIGN[rng.choice(tuple(FOREIGN))]
    n = rng.choice((2, 4))
    roles = ("user", "assistant", "user", "assistant")
    return category, [[r, t.format_map(s)] for r, t in zip(roles[:n], turns[:n], strict=True)]
