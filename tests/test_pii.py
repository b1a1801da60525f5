"""PII redaction: every kind found, look-alikes kept, the kinds configurable, and a secret in the
incoming data never reaching the prepared records, the logs, the reports or MLflow."""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from retune.config import IngestParams, Params, ValidateParams, load_params
from retune.data.pii import (
    KINDS,
    PLACEHOLDERS,
    Redactor,
    find,
    iban_ok,
    looks_random,
    luhn_ok,
    redact,
)
from retune.errors import DataValidationError
from tests.helpers import ROOT, make_conversations

OPENAI_KEY = "sk-proj-Zr8TqX2mVb7LpK4nWc9YhD3sFg6JuA1e"
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAvRk3cdTq8mJ2uW7yXhLZ0pQ4sN1eB5fG9aK6jD2vC8xYzT3r\n"
    "Qm7nP4kL2wS9vB1cX5zF8hJ3gD6tA0eR7yU4iO2pM9nK1bV3cX6zL8jH5gF2dS4a\n"
    "-----END RSA PRIVATE KEY-----"
)


def _kinds(text: str) -> list[tuple[str, str]]:
    return [(m.kind, text[m.start : m.end]) for m in find(text)]


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("Mail jane.doe+shop@mail.co.uk today", "email", "jane.doe+shop@mail.co.uk"),
        ("メールはtaro@example.jpです", "email", "taro@example.jp"),
        ("écrivez à chloé.dubois@exemple.fr.", "email", "chloé.dubois@exemple.fr"),
        ("call +1 (415) 555-0132 now", "phone", "+1 (415) 555-0132"),
        ("call 415.555.0132", "phone", "415.555.0132"),
        ("Ruf an: 030 12345678", "phone", "030 12345678"),
        ("UK office +44 20 7946 0958.", "phone", "+44 20 7946 0958"),
        ("Llámame al 612 33 99 13", "phone", "612 33 99 13"),
        ("電話番号は03-1234-5678です", "phone", "03-1234-5678"),
        ("0044 20 7946 0958", "phone", "0044 20 7946 0958"),
        ("card 4111 1111 1111 1111 exp 12/27", "card", "4111 1111 1111 1111"),
        ("amex 3782-822463-10005", "card", "3782-822463-10005"),
        ("paid with 5555555555554444.", "card", "5555555555554444"),
        ("IBAN DE89 3704 0044 0532 0130 00 is mine", "iban", "DE89 3704 0044 0532 0130 00"),
        ("iban=GB82WEST12345698765432", "iban", "GB82WEST12345698765432"),
        ("from 203.0.113.45:8080", "ip", "203.0.113.45"),
        ("host [2001:db8::8a2e:370:7334]:443", "ip", "2001:db8::8a2e:370:7334"),
        ("link fe80::1ff:fe23:4567:890a%eth0 down", "ip", "fe80::1ff:fe23:4567:890a%eth0"),
        ("SSN 123-45-6789.", "ssn", "123-45-6789"),
        ("my social security number is 123456789", "ssn", "123456789"),
        (f"key {OPENAI_KEY}", "secret", OPENAI_KEY),
        ("token ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8", "secret", "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"),  # noqa: E501
        ("AKIAIOSFODNN7EXAMPLE in the config", "secret", "AKIAIOSFODNN7EXAMPLE"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.sig-Abc123", "secret",
         "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.sig-Abc123"),
        ('"password": "Tr0ub4dor&3"', "secret", "Tr0ub4dor&3"),
        ("postgres://app:s3cr3t-Pw@db.internal:5432/app", "secret", "s3cr3t-Pw"),
        ("export KEY=Xq7Lm2Pz9Rt4Vw8Ny3Bc6Df1", "secret", "Xq7Lm2Pz9Rt4Vw8Ny3Bc6Df1"),
        (f"the key file:\n{PEM}\nthanks", "secret", PEM),
    ],
)  # fmt: skip
def test_each_kind_is_found_whole(text: str, kind: str, value: str) -> None:
    assert _kinds(text) == [(kind, value)]
    redacted, counts = redact(text)
    assert redacted == text.replace(value, PLACEHOLDERS[kind])
    assert counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "Order NW-483920 from 2024-05-01 ships 2024-05-03; ticket 58213.",
        "Order 2125551234 and order #48392017, invoice INV-2024-00123, case number 03358255",
        "Amazon order 112-4567890-1234567 arrived",
        "at 2024-05-07 21:24:05, again 05.04.2023 and 12/31/2024 14:05",
        "it costs $1,299.00 or 1.299,00 € (1,234,567 sold)",
        "firmware 2.14.1, version 1.2.3.4, build 10.0.19041.1, v4.2.1.0",
        "UPS 1Z999AA10123456784, USPS 9400 1000 0000 0000 0000 00, FedEx 7489 1234 5678",
        "ISBN 978-3-16-148410-0 and ISBN 0-306-40615-2",
        "not a card 4111 1111 1111 1112, nor 1234 5678 9012 3456",
        "invalid IBAN DE89 3704 0044 0532 0130 01",
        "999.1.2.3 and 256.1.1.1 and 1.2.3",
        "SSN-like 000-12-3456, 666-12-3456, 912-34-5678, 078-05-1120; SKU 123-456-789",
        "commit 3f786850e387550fdab836ed7e6dc881de23001b, fixed in 3f78685",
        "id 123e4567-e89b-12d3-a456-426614174000, sha256:" + "ab" * 32,
        "MAC 00:1A:2B:3C:4D:5E at 12:30:45, ratio 16:9, std::vector",
        "see getUserAccountSettingsById2 in /usr/local/lib/python3.11/site-packages",
        "api_key=YOUR_API_KEY, Authorization: Bearer <token>, password: ********",
        "I reset my password yesterday; the token expires in 24 hours",
        "@jane_support and icon@2x.png, ZIP 94105-1234",
    ],
)
def test_look_alikes_survive(text: str) -> None:
    assert find(text) == [], _kinds(text)


def test_validators() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE89370400440532013001")
    assert not iban_ok("XX89370400440532013000")  # no such country
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    keys = ["".join(rng.choice(alphabet) for _ in range(40)) for _ in range(200)]
    assert sum(map(looks_random, keys)) >= 195
    assert not looks_random("AbstractSingletonProxyFactoryBean42")
    assert not looks_random("0123456789abcdef0123456789abcdef01234567")  # hex: a hash


def test_only_the_configured_kinds_are_redacted() -> None:
    text = "mail a@b.com, call 415-555-0132, card 4111 1111 1111 1111"
    out, counts = redact(text, ["email", "card"])
    assert out == "mail [EMAIL], call 415-555-0132, card [CARD]"
    assert counts == {"email": 1, "card": 1}
    with pytest.raises(ValueError, match="horoscope"):
        Redactor(["email", "horoscope"])


def test_every_kind_is_on_by_default_in_code_and_params_yaml() -> None:
    assert IngestParams().redact == KINDS
    assert load_params(ROOT / "params.yaml").ingest.redact == KINDS


def _mixed_texts() -> list[str]:
    """The PII corpus, plus its pieces glued together where detectors meet and overlap."""
    from benchmarks.pii_corpus import generate

    texts = [ex.text for ex in generate(40, seed=3)]
    rng = random.Random(1)
    pieces = [*texts, "+1 (415) 555-0132", "4111 1111 1111 1111", "::ffff:10.0.0.1", "a@b.io",
              " ", "\n", "-", ":", "=", "password=", "Bearer ", "\x00", "2024-05-01",
              "99"]  # fmt: skip
    return texts + ["".join(rng.choices(pieces, k=rng.randint(2, 6))) for _ in range(300)]


def test_prefilters_never_hide_a_match() -> None:
    """`find` skips detectors when a cheap check fails; that must never lose a match."""
    redactor = Redactor(KINDS)
    for text in _mixed_texts():
        assert redactor.find(text) == redactor.find(text, prefilter=False), text


def test_one_pass_names_the_kinds_each_single_kind_check_finds() -> None:
    """validate asks `kinds_in` once per text for its seven per-kind expectations; each must
    pass or fail exactly as a check of that kind alone would, overlaps between kinds included."""
    redactor = Redactor(KINDS)
    texts = _mixed_texts()
    found = [redactor.kinds_in(text) for text in texts]
    assert {k for kinds in found for k in kinds} == set(KINDS)  # every kind is exercised
    for text, kinds in zip(texts, found, strict=True):
        assert kinds == {k for k in KINDS if find(text, (k,))}, text


def test_redaction_leaves_nothing_validate_would_find() -> None:
    from benchmarks.pii_corpus import generate

    for ex in generate(30, seed=4):
        out, _ = redact(ex.text)
        assert find(out) == [], (ex.text, out)


def test_many_texts_redact_as_one_and_keep_their_boundaries() -> None:
    redactor = Redactor(KINDS)
    texts = ["call 415-555-0132", "2024-05-01T10:00:00Z", "4111 1111", "1111 1111", "x\x00y"]
    out, counts = redactor.redact_many(texts)
    assert out == ["call [PHONE]", "2024-05-01T10:00:00Z", "4111 1111", "1111 1111", "x\x00y"]
    assert counts == {"phone": 1}


def test_a_secret_at_the_end_of_one_text_does_not_swallow_the_next() -> None:
    # A secret's value runs to the next whitespace; the separator between texts is not one.
    out, counts = Redactor(KINDS).redact_many(["my password=hunter22abc", "thanks"])
    assert out == [redact("my password=hunter22abc")[0], "thanks"]
    assert "hunter22abc" not in out[0] and counts["secret"] == 1


class _Reads:
    """A compiled pattern that counts the characters its searches and matches read."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern, self.read = pattern, 0

    def search(self, text: str, pos: int = 0) -> re.Match[str] | None:
        found = self.pattern.search(text, pos)
        self.read += (found.end() if found else len(text)) - pos
        return found

    def match(self, text: str, pos: int = 0) -> re.Match[str] | None:
        found = self.pattern.match(text, pos)
        self.read += (found.end() if found else pos) - pos
        return found


def _pathological(size: int) -> dict[str, tuple[str, str, dict[str, int]]]:
    """Texts of `size` characters that made a detector read the rest of the text per line or
    per value: name -> (text, its redaction, counts)."""
    begin = "-----BEGIN RSA PRIVATE KEY-----\n"
    lines = size // len(begin)
    dollars = size // len("pwd=$")
    return {
        "BEGIN lines, no END": (begin * lines, "[SECRET]\n" * lines, {"secret": lines}),
        # The first BEGIN line runs to the one END line: the whole text is one block.
        "BEGIN lines, one END": (begin * lines + PEM, "[SECRET]", {"secret": 1}),
        "BEGIN and blanks": (
            "-----BEGIN PRIVATE KEY-----" + " \t" * (size // 2) + "!",
            "[SECRET]" + " \t" * (size // 2) + "!",
            {"secret": 1},
        ),
        # Every value starts with "$" (a placeholder) and holds the next assignment.
        "nested placeholder values": (
            "pwd=$" * dollars + "pwd=hunter22!x",
            "pwd=$" * dollars + "pwd=[SECRET]",
            {"secret": 1},
        ),
    }


@pytest.mark.parametrize("name", list(_pathological(100)))
def test_pathological_secret_texts_are_redacted_reading_each_character_a_few_times(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """400 KB of BEGIN lines without an END line took minutes: each line's search for its END
    read the rest of the text. The END, NUL and value searches now read the text about once."""
    import retune.data.pii_secrets as pii

    text, redacted, counts = _pathological(400_000)[name]
    reads = {n: _Reads(getattr(pii, n)) for n in ("_KEY_END_RE", "_NUL", "_VALUE_RUN")}
    for n, counting in reads.items():
        monkeypatch.setattr(pii, n, counting)
    assert redact(text) == (redacted, counts)
    for n, counting in reads.items():
        assert counting.read <= 2 * len(text), n


def test_secret_families_find_what_their_patterns_match() -> None:
    """`_private_keys` and `_assignments` find the spans their `_SECRET_FAMILIES` patterns
    describe (on texts small enough for those patterns' worst cases)."""
    from retune.data.pii_secrets import _SECRET_FAMILIES, _assignments, _private_keys, _value_ok

    rng = random.Random(2)
    pieces = ["-----BEGIN RSA PRIVATE KEY-----", "-----END RSA PRIVATE KEY-----", "\n", " ",
              "\t", "\x00", "MIIEowIBAAKCAQEAvRk3", "Proc-Type: 4,ENCRYPTED", "-----END ",
              "-----BEGIN PGP PRIVATE KEY BLOCK-----", "password=", "pwd: ", "token=\"", "$",
              "your_", "XXXXXXXX", "aaaaaaaa", "hunter22", ".", ",", ":", "!", "=", "x1",
              "required", "Passwort: ", "Tr0ub4dor&3", "A1b2C3d4E5f6G7h8I9j0"]  # fmt: skip
    key = re.compile(_SECRET_FAMILIES["private_key"])
    assignment = re.compile(_SECRET_FAMILIES["assignment"])
    for _ in range(3000):
        text = "".join(rng.choices(pieces, k=rng.randint(1, 14)))
        assert list(_private_keys(text)) == [m.span() for m in key.finditer(text)], text
        expected, pos = [], 0
        while a := assignment.search(text, pos):
            start, value = a.start("assignment"), a["assignment"].rstrip(".,:!?")
            if len(value) >= 8 and _value_ok(text, start, start + len(value)):
                expected.append((start, start + len(value)))
                pos = a.end()
            else:
                pos = start
        assert list(_assignments(text)) == expected, text


def test_digit_floods_cost_a_bounded_number_of_phone_scans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twenty 50 KB feedback corrections of "1 1 1 ..." held a chat for a minute: phonenumbers
    read each run of digits whole, once per region. A long run is now read in short pieces,
    each distinct piece once, and a text gets `PHONE_SCANS_PER_TEXT` scans; the runs left after
    them are redacted unread."""
    import retune.data.pii_phones as pii

    scans: list[str] = []
    scan = pii._scan

    def counting(window: str, region: str, leniency: object) -> list[object]:
        scans.append(window)
        return scan(window, region, leniency)

    monkeypatch.setattr(pii, "_scan", counting)
    regions = 1 + len(pii.PHONE_TRUNK_REGIONS) + len(pii.PHONE_GROUPED_REGIONS)
    # Per pass of `redact` (four at most): the budget, overrun by the regions of the last piece.
    most = 4 * (pii.PHONE_SCANS_PER_TEXT + regions)

    ones = "1 " * 200_000  # 400 KB, no phone number in it
    assert redact(ones) == (ones, {})
    assert len(scans) <= 3 * regions  # its first, middle and last pieces, once each
    assert max(map(len, scans)) <= pii._PIECE + 2 * pii._MARGIN  # not the whole run

    scans.clear()
    numbers = ", ".join(f"415-555-{i:04d}" for i in range(5000))  # more than the budget reads
    assert redact(numbers) == (", ".join(["[PHONE]"] * 5000), {"phone": 5000})
    assert len(scans) <= most

    scans.clear()
    rng = random.Random(0)
    soup = " ".join(rng.choices("0123456789", k=32_000))  # every piece a different one
    out, counts = redact(soup)
    assert find(out) == [] and counts["phone"] >= 1
    assert sum(c.isdigit() for c in out) < 1000  # the runs past the budget, redacted unread
    assert len(scans) <= most
    assert max(map(len, scans)) <= pii._PIECE + 2 * pii._MARGIN

    # A run too long to read at once is read in parts where it lists numbers.
    listed = ["+1 415 555 0132", "030 12345678", "+44 20 7946 0958", "612 33 99 13",
              "(415) 555-0187", "0044 20 7946 0959", "03-1234-5678", "415.555.0199"]  # fmt: skip
    for sep in (" / ", " - ", ". "):
        text = f"Numbers: {sep.join(listed)}."
        assert redact(text) == (f"Numbers: {sep.join(['[PHONE]'] * 8)}.", {"phone": 8}), sep


def test_many_matches_resolve_in_one_pass() -> None:
    text = "mail a@b.io or call 415-555-0132; " * 3000
    out, counts = redact(text)
    assert out == "mail [EMAIL] or call [PHONE]; " * 3000
    assert counts == {"email": 3000, "phone": 3000}


def test_placeholders_are_single_tokens_of_the_scratch_tokenizer() -> None:
    from retune.model.modeling import train_tokenizer

    texts = [" ".join(c for _, c in conv) for conv in make_conversations(60)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    for placeholder in PLACEHOLDERS.values():
        ids = tokenizer.encode(f"call me at {placeholder}.", add_special_tokens=False)
        assert tokenizer.convert_tokens_to_ids(placeholder) in ids, placeholder


def _incoming(params: Params) -> None:
    """Clean conversations plus one of each kind, in the text and in an extra field."""
    incoming = params.paths.incoming
    incoming.mkdir(parents=True, exist_ok=True)
    lines = [
        {"messages": [{"role": r, "content": c} for r, c in conv]}
        for conv in make_conversations(30)
    ]
    lines.append(
        {
            "messages": [
                {"role": "user", "content": f"My key {OPENAI_KEY} fails, card 4111 1111 1111 1111"},
                {"role": "assistant", "content": "Please never share keys. Rotate it now."},
            ],
            "notes": f"customer pasted {OPENAI_KEY}",
            "conversation_id": "jane.doe@example.com",
        }
    )
    lines.append(
        {
            "messages": [
                {"role": "user", "content": f"Here is my deploy key:\n{PEM}\nSSN 123-45-6789"},
                {"role": "assistant", "content": "Thanks, we have revoked it."},
            ]
        }
    )
    text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
    (incoming / "chats.jsonl").write_text(text, encoding="utf-8")


def _leaks(root: Path, secrets: list[str], skip: tuple[Path, ...]) -> list[str]:
    """Files under `root` (not under `skip`) that contain any of `secrets`, whatever format."""
    found = []
    for path in root.rglob("*"):
        if not path.is_file() or any(path.is_relative_to(s) for s in skip):
            continue
        data = path.read_bytes()
        if path.suffix == ".parquet":
            data = json.dumps(pq.read_table(path).to_pylist(), default=str).encode()
        found += [f"{path}: {s[:12]}" for s in secrets if s.encode() in data]
    return found


@pytest.mark.slow
def test_secrets_never_reach_records_reports_logs_or_mlflow(
    tiny_params: Params, capsys: pytest.CaptureFixture[str]
) -> None:
    from tasks import ingest, validate

    params = tiny_params
    _incoming(params)
    result = ingest.run(params)

    counts = json.loads((params.paths.reports / "ingest.json").read_text())["redactions"]
    assert counts == {"email": 1, "phone": 0, "card": 1, "iban": 0, "ip": 0, "ssn": 1, "secret": 3}
    records = pq.read_table(result.records_file).to_pylist()
    assert len(records) == 32
    pasted = next(r for r in records if "[SECRET] fails" in r["text"])
    assert json.loads(pasted["meta"]) == {"notes": "customer pasted [SECRET]"}
    assert pasted["conversation_id"].startswith("[EMAIL]-")  # still one id, pseudonymised
    assert any("Here is my deploy key:\n[SECRET]\nSSN [SSN]" in r["text"] for r in records)

    # validate reads what hygiene leaves in paths.clean; here, the prepared records as they are.
    shutil.copytree(params.paths.prepared, params.paths.clean, dirs_exist_ok=True)
    # Other expectations may fail on 32 tiny records; the PII ones must not.
    with contextlib.suppress(DataValidationError):
        validate.run(params)
    report = json.loads((params.paths.reports / "validate.json").read_text())
    outcome = {e["name"]: e["success"] for e in report["expectations"]}
    assert all(outcome[f"no_{kind}"] for kind in KINDS), outcome

    secrets = [OPENAI_KEY, PEM.splitlines()[1], "4111 1111 1111 1111", "123-45-6789", "jane.doe@"]
    # Everything retune wrote: records, reports, Data Docs, the MLflow store (params, tags,
    # artifacts). Incoming and quarantine hold the input as the user gave it.
    keep = (params.paths.incoming, params.paths.quarantine)
    assert _leaks(params.paths.incoming.parents[1], secrets, keep) == []
    out = capsys.readouterr()
    assert not any(s in out.out + out.err for s in secrets)


def test_ingest_warns_loudly_without_secret_and_keeps_the_kinds_it_is_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tasks.ingest import ingest

    incoming = tmp_path / "in"
    incoming.mkdir()
    line = {"messages": [{"role": "user", "content": f"mail a@b.com key {OPENAI_KEY}"},
                         {"role": "assistant", "content": "ok"}]}  # fmt: skip
    (incoming / "a.jsonl").write_text(json.dumps(line) + "\n")
    result = ingest(incoming, IngestParams(redact=("email",)), tmp_path / "p", tmp_path / "q")
    assert "WARNING: ingest.redact does not list `secret`" in capsys.readouterr().out
    assert result.report["redactions"] == {"email": 1}
    assert result.report["redact"] == ["email"]
    [record] = pq.read_table(result.records_file).to_pylist()
    assert record["text"] == f"mail [EMAIL] key {OPENAI_KEY}\nok"


def test_validation_names_file_and_line_of_residual_pii(tmp_path: Path) -> None:
    """Records prepared with redaction off fail a suite that expects it on."""
    from tasks.ingest import ingest
    from tasks.validate import check, error_message

    incoming = tmp_path / "in"
    incoming.mkdir()
    lines = [
        {"messages": [{"role": "user", "content": f"question {i}"},
                      {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(4)
    ]  # fmt: skip
    lines.insert(2, {"messages": [{"role": "user", "content": f"key {OPENAI_KEY}, IBAN "
                                   "DE89 3704 0044 0532 0130 00"},
                                  {"role": "assistant", "content": "ok"}]})  # fmt: skip
    (incoming / "chat.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = ingest(incoming, IngestParams(redact=()), tmp_path / "p", tmp_path / "q")

    outcome = check(result.records_file, ValidateParams(min_examples=1), KINDS)
    assert not outcome.success
    failed = {o.name: o for o in outcome.failed}
    assert set(failed) == {"no_secret", "no_iban"}
    message = error_message(outcome)
    assert "chat.jsonl:3" in message
    assert "run ingest again" in message and "[SECRET]" in message
    assert OPENAI_KEY not in message  # the snippet is masked
    assert check(result.records_file, ValidateParams(min_examples=1), ("email",)).success


def test_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    from benchmarks import pii as bench

    out = tmp_path / "pii.json"
    bench.main(["--n", "15", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["name"] == "pii" and result["command"].startswith("python -m benchmarks.pii")
    rows = {r["metric"]: r for r in result["rows"]}
    for kind in KINDS:
        assert 0.8 <= rows[f"recall_{kind}"]["value"] <= 1.0, kind
        assert 0.8 <= rows[f"precision_{kind}"]["value"] <= 1.0, kind
        assert rows[f"recall_{kind}"]["target"].startswith(">=")
    assert set(rows["throughput"]) == {"metric", "value", "unit", "target", "note"}
