"""The hygiene stage: abusive text quarantined with the reason, civil complaints kept, one of
each group of near-duplicates kept, every record accounted for and traceable to its line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from retune.config import HygieneParams, Params, RepresentationParams, SampleParams, to_plain
from retune.data.lineage import data_version, trace
from retune.data.records import Record, write_records
from tasks.hygiene import hygiene, run

BILLING = [
    ("user", "Hi, I was charged twice for order NW-482913 on March 3. Can you check?"),
    (
        "assistant",
        "Thanks for reaching out, Maria. I found the duplicate charge on order NW-482913 and "
        "refunded $149.99; it will be back on your card within five business days.",
    ),
    ("user", "Great, will I get a confirmation email about the refund?"),
    ("assistant", "Yes, the confirmation for the refund is on its way to your inbox."),
]
SETUP = [
    ("user", "My new camera is not found by the app during setup, the light keeps blinking."),
    (
        "assistant",
        "Let's start fresh: press the reset pin next to the USB port for five seconds, then "
        "hold the QR code about twenty centimeters from the lens.",
    ),
]
SHIPPING = [
    ("user", "Tracking says my doorbell was delivered yesterday but nothing is at my door."),
    (
        "assistant",
        "I'm sorry about that. I've opened a claim with the carrier, case 55120, and a "
        "replacement ships at no cost if the package isn't found within two days.",
    ),
]
WARRANTY = [
    ("user", "This is ridiculous, I want a refund. The lock jams halfway every single time."),
    (
        "assistant",
        "I understand the frustration. Your lock is under warranty, so I've approved a full "
        "refund under case 88213 and emailed you a prepaid return label.",
    ),
]
FIRMWARE = [
    ("user", "I hate this thermostat. The update has been stuck for hours."),
    (
        "assistant",
        "Please unplug it for thirty seconds and plug it back in; the firmware update resumes "
        "on its own and keeps your schedules.",
    ),
]
ABUSIVE_TERM = [
    ("user", "You people are useless idiots. Where is my speaker?"),
    ("assistant", "I'm sorry for the wait. Your speaker shipped this morning."),
]
ABUSIVE_MODEL = [
    ("user", "My hub lost all its sensors again."),
    ("assistant", "This is the worst shit I have ever had to fix, you clown. Re-add them."),
]


def paraphrase(msgs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A greeting added, a word changed, casing and punctuation shuffled."""
    (role, first), *rest = msgs
    edited = [(role, "Hello there! " + first.lower().replace("check", "look"))]
    return edited + [(r, c.replace(",", "")) for r, c in rest]


def record(msgs: list[tuple[str, str]], source: str, line: int, **meta: Any) -> dict[str, Any]:
    return Record(tuple(msgs), source, line, "chat_jsonl", meta=meta).to_row()


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """Prepared records: five distinct (two of them angry but civil), a paraphrase of the first
    in another file, two abusive ones."""
    rows = [
        record(BILLING, "a.jsonl", 1, category="billing"),
        record(SETUP, "a.jsonl", 2, category="setup"),
        record(SHIPPING, "a.jsonl", 3, category="shipping"),
        record(WARRANTY, "a.jsonl", 4, category="warranty"),
        record(ABUSIVE_TERM, "a.jsonl", 5, category="shipping"),
        record(paraphrase(BILLING), "b.jsonl", 1, category="billing"),
        record(FIRMWARE, "b.jsonl", 2, category="firmware"),
        record(ABUSIVE_MODEL, "b.jsonl", 3),
    ]
    write_records(rows, tmp_path / "prepared" / "records.parquet")
    return tmp_path


def changes(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_abuse_is_quarantined_with_the_reason_and_civil_anger_is_kept(mixed: Path) -> None:
    result = hygiene(mixed / "prepared", HygieneParams(), mixed / "clean")
    logged = {(c["source"], c["line"]): c for c in changes(result.changes_file)}
    term, model = logged[("a.jsonl", 5)], logged[("b.jsonl", 3)]
    assert term["stage"] == model["stage"] == "hygiene"
    assert term["reason"] == model["reason"] == "unsafe"
    assert term["term"] == "idiots" and "blocklist term 'idiots'" in term["detail"]
    assert term["role"] == "user" and term["sentence"] == "You people are useless idiots."
    assert model["term"] is None and model["score"] >= 0.93 and model["role"] == "assistant"
    assert "classifier probability" in model["detail"]
    kept = pq.read_table(result.records_file).to_pylist()
    texts = "\n".join(r["text"] for r in kept)
    assert "This is ridiculous, I want a refund." in texts
    assert "I hate this thermostat." in texts


def test_a_paraphrase_goes_and_points_at_the_kept_original(mixed: Path) -> None:
    result = hygiene(mixed / "prepared", HygieneParams(), mixed / "clean")
    (dup,) = [c for c in changes(result.changes_file) if c["reason"] == "near_duplicate"]
    assert (dup["source"], dup["line"]) == ("b.jsonl", 1)
    assert (dup["kept_source"], dup["kept_line"]) == ("a.jsonl", 1)
    assert dup["similarity"] >= 0.8 and "a.jsonl:1, which was kept" in dup["detail"]
    kept = pq.read_table(result.records_file)
    assert dup["kept_id"] in kept.column("id").to_pylist()
    assert dup["id"] not in kept.column("id").to_pylist()


def test_every_record_is_accounted_for(mixed: Path) -> None:
    result = hygiene(mixed / "prepared", HygieneParams(), mixed / "clean")
    report = result.report
    assert result.removed == {"unsafe": 2, "near_duplicate": 1}
    assert report["input"] == 8 == report["kept"] + sum(report["removed"].values())
    assert report["accounted"] and report["changes_logged"] == 3
    for counts in report["by_source"].values():
        assert counts["input"] == counts["kept"] + counts["unsafe"] + counts["near_duplicate"]
    assert report["by_source"]["b.jsonl"] == {
        "input": 3,
        "kept": 1,
        "unsafe": 1,
        "near_duplicate": 1,
    }
    prepared_ids = set(
        pq.read_table(mixed / "prepared" / "records.parquet").column("id").to_pylist()
    )
    kept_ids = set(pq.read_table(result.records_file).column("id").to_pylist())
    logged_ids = {c["id"] for c in changes(result.changes_file)}
    assert kept_ids | logged_ids == prepared_ids and not kept_ids & logged_ids
    manifest = json.loads(result.manifest_file.read_text())
    assert manifest["data_version"] == data_version(kept_ids) == result.data_version
    assert manifest["n_records"] == 5
    cats = report["representation"]["categories"]
    assert cats["records_with"] == 5 and cats["counts"]["setup"] == 1
    assert report["representation"]["languages"]["counts"] == {"en": 5}


def test_run_writes_the_report_and_the_representation_chart(tiny_params: Params) -> None:
    rows = [
        record(msgs, "a.jsonl", i + 1, category=cat)
        for i, (msgs, cat) in enumerate(
            [(BILLING, "billing"), (SETUP, "setup"), (SHIPPING, "shipping")]
        )
    ]
    write_records(rows, tiny_params.paths.prepared / "records.parquet")
    result = run(tiny_params)
    report = json.loads((tiny_params.paths.reports / "hygiene.json").read_text())
    assert report["kept"] == result.n_kept == 3
    assert report["representation"]["categories"]["shares"] == pytest.approx(
        {"billing": 1 / 3, "setup": 1 / 3, "shipping": 1 / 3}, abs=1e-5
    )
    assert (tiny_params.paths.reports / "hygiene.png").read_bytes()[:4] == b"\x89PNG"


def _register_trained(params: Params, left_out: list[str | None] | None, train_sha: str) -> None:
    """A new registered version whose run trained on the train split less the `left_out`
    records (logged as register logs them); None: it logged no train rows."""
    import mlflow
    import pyarrow.compute as pc

    from retune.release.tracking import setup_tracking
    from tasks.register import log_train_rows

    setup_tracking(params.tracking)
    client = mlflow.MlflowClient()
    with mlflow.start_run(tags={"train_file_sha256": train_sha}) as active:
        if left_out is not None:
            table = pq.read_table(params.paths.split / "train.parquet")
            keep = pc.invert(
                pc.is_in(table.column("id"), value_set=pa.array(left_out, type=pa.string()))
            )
            kept = params.paths.reports.parent / "trained.parquet"
            pq.write_table(table.filter(keep), kept)
            log_train_rows(kept, {})
    name = params.register.model_name
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    run_id = active.info.run_id
    client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)


def test_each_line_of_a_file_is_traced_to_where_it_went(tiny_params: Params) -> None:
    """ingest -> hygiene -> split, then `retune trace`: every line of the input file is named
    once, with what happened to it."""
    from tasks import split
    from tasks.ingest import ingest

    incoming = tiny_params.paths.incoming
    incoming.mkdir(parents=True)
    distinct = [
        [
            ("user", f"Question {i}: {' '.join(f'topic{i}x{j}' for j in range(25))}"),
            ("assistant", f"Answer {i}: {' '.join(f'reply{i}y{j}' for j in range(25))}"),
        ]
        for i in range(20)
    ]
    lines = [
        {"messages": [{"role": r, "content": c} for r, c in BILLING]},  # 1 kept
        '{"messages": [',  # 2 malformed
        {"messages": [{"role": r, "content": c} for r, c in BILLING]},  # 3 exact duplicate
        {"messages": [{"role": r, "content": c} for r, c in paraphrase(BILLING)]},  # 4 near
        {"messages": [{"role": r, "content": c} for r, c in ABUSIVE_TERM]},  # 5 unsafe
    ] + [{"messages": [{"role": r, "content": c} for r, c in d]} for d in distinct]
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    (incoming / "chats.jsonl").write_text(text, encoding="utf-8")

    paths = tiny_params.paths
    ingest(incoming, tiny_params.ingest, paths.prepared, paths.quarantine)
    # The default threshold (tiny_params raises it for its templated corpus).
    hygiene(paths.prepared, HygieneParams(), paths.clean)
    split.run(tiny_params)

    steps = trace(paths, "chats.jsonl")
    assert [s.line for s in steps] == list(range(1, len(lines) + 1))
    by_line = {s.line: s for s in steps}
    assert by_line[2].outcome == "quarantined" and by_line[2].detail.startswith("malformed_json")
    assert by_line[3].outcome == "quarantined" and by_line[3].detail.startswith("duplicate")
    assert by_line[4].outcome == "removed" and "chats.jsonl:1, which was kept" in by_line[4].detail
    assert by_line[5].outcome == "removed" and by_line[5].detail.startswith("unsafe")
    kept = [s for s in steps if s.outcome in ("train", "holdout")]
    assert len(kept) == 21 and {s.outcome for s in kept} == {"train", "holdout"}

    params_file = tiny_params.paths.reports.parent / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_plain(tiny_params)), encoding="utf-8")
    out = CliRunner().invoke(app, ["trace", "chats.jsonl", "--params", str(params_file)])
    assert out.exit_code == 0, out.output
    assert "malformed_json" in out.output and "near_duplicate" in out.output
    assert "chats.jsonl: 25 units:" in out.output
    assert "trained by" in out.output and "not known what" not in out.output  # none registered

    # Registered versions: v1 trained on every train line but one, v2 on all of them, v3 was
    # registered before versions recorded their rows (and on another split).
    first_train = next(s for s in kept if s.outcome == "train")
    _register_trained(tiny_params, [first_train.record_id], "0" * 64)
    _register_trained(tiny_params, [], "0" * 64)
    _register_trained(tiny_params, None, "0" * 64)
    out = CliRunner().invoke(app, ["trace", "chats.jsonl", "--params", str(params_file)])
    assert out.exit_code == 0, out.output
    trained = {}
    for row in out.output.splitlines():
        cells = [c.strip() for c in row.split("|")] if "|" in row else row.split()
        if cells and cells[0].isdigit():
            trained[int(cells[0])] = cells[3]
    assert set(trained) == set(by_line)
    for s in steps:
        expected = {"train": "v2,v1", "holdout": "none"}.get(s.outcome, "none")
        if s.line == first_train.line:
            expected = "v2"
        assert trained[s.line] == expected, (s, out.output)
    assert "not known what v3 trained on" in out.output
    missing = CliRunner().invoke(app, ["trace", "nope.csv", "--params", str(params_file)])
    assert missing.exit_code == 1 and "no record or log entry comes from 'nope.csv'" in (
        missing.output
    )


@pytest.mark.slow
def test_the_sample_passes_validation_after_hygiene(tmp_path: Path) -> None:
    """The generated corpus (reduced size) through ingest and hygiene: every planted abusive
    conversation quarantined, no civil complaint, and the clean data meets the contract and
    the representation expectations."""
    from retune.config import IngestParams, ValidateParams
    from tasks.ingest import ingest
    from tasks.sample import _COMPLAINTS, generate
    from tasks.validate import check, error_message

    planted = generate(SampleParams(conversations=3_000), 42, tmp_path / "incoming")
    ingest(tmp_path / "incoming", IngestParams(), tmp_path / "prepared", tmp_path / "quarantine")
    result = hygiene(tmp_path / "prepared", HygieneParams(), tmp_path / "clean")
    unsafe = [c for c in changes(result.changes_file) if c["reason"] == "unsafe"]
    assert len(unsafe) == planted.defects["abusive"]
    assert not any(c["sentence"] in _COMPLAINTS for c in unsafe)
    assert result.removed["near_duplicate"] >= planted.defects["near_duplicate"]
    checked = check(
        result.records_file,
        ValidateParams(min_examples=2_500),
        tuple(IngestParams().redact),
        representation=RepresentationParams(),
    )
    assert checked.success, error_message(checked)
    assert {"category_share", "language_share"} <= {o.name for o in checked.expectations}
