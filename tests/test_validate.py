"""The data contract: good records pass; each kind of bad record is stopped, named, and located."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from retune.config import Params, RepresentationParams, ValidateParams
from retune.data.records import ROLE_ORDER_REGEX, Record, read_records, write_records
from retune.errors import DataValidationError
from tasks.validate import build_suite, check, error_message, run

REDACT = ("email", "phone")
GOOD = [
    (("user", "My router won't turn on."), ("assistant", "Hold the power button.")),
    (("system", "Be brief."), ("user", "Refund status?"), ("assistant", "Sent today.")),
    (("text", "A plain document about thermostats."),),
    (("user", "Order 123456 arrived damaged."), ("assistant", "A replacement ships today.")),
    (("user", "Camera offline since 2024-05-01."), ("assistant", "Update the firmware.")),
]


def frame(*bad: tuple[tuple[str, str], ...]) -> pd.DataFrame:
    """The five good records from chat.jsonl lines 1-5, then `bad` records from line 6 on."""
    rows = [
        Record(messages=m, source="chat.jsonl", line=i + 1, format="chat_jsonl").to_row()
        for i, m in enumerate([*GOOD, *bad])
    ]
    return pd.DataFrame(rows)


def mlflow_runs(params: Params) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(params.tracking.uri)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    return client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'validate'")


def test_suite_is_declared_from_params_and_the_ingest_patterns() -> None:
    cfg = ValidateParams(min_examples=7, min_chars=2, max_chars=99)
    suite = {e.meta["name"]: e for e in build_suite(cfg, REDACT)}
    assert suite["min_examples"].min_value == 7
    assert "validate.min_examples" in suite["min_examples"].description
    assert (suite["text_length"].min_value, suite["text_length"].max_value) == (2, 99)
    assert suite["unique_id"].column == "id"
    assert suite["role_order"].regex == ROLE_ORDER_REGEX
    # The same detector ingest redacts with, kind by kind, so the two can never disagree.
    assert suite["no_email"].kind == "email"
    assert suite["no_phone"].kind == "phone"
    assert not any(n.startswith("no_") for n in (e.meta["name"] for e in build_suite(cfg, ())))


def test_good_records_pass() -> None:
    result = check(frame(), ValidateParams(min_examples=5), REDACT)
    assert result.success, error_message(result)
    assert result.n_records == 5
    assert len(result.expectations) == 7


@pytest.mark.parametrize(
    ("bad", "failed", "where"),
    [
        pytest.param((("text", ""),), "text_length", "chat.jsonl:6", id="empty-text"),
        pytest.param(GOOD[1], "unique_id", "chat.jsonl:6", id="duplicate"),
        pytest.param(
            (("assistant", "Hello, how can I help?"), ("user", "Reset my camera.")),
            "role_order",
            "chat.jsonl:6",
            id="assistant-first",
        ),
        pytest.param(
            (("user", "Mail me at jane.doe@example.com"), ("assistant", "Will do.")),
            "no_email",
            "chat.jsonl:6",
            id="residual-email",
        ),
        pytest.param(
            (("user", "Call me on +1 415-555-0132"), ("assistant", "Will do.")),
            "no_phone",
            "chat.jsonl:6",
            id="residual-phone",
        ),
    ],
)
def test_each_bad_record_is_stopped_and_located(
    bad: tuple[tuple[str, str], ...], failed: str, where: str
) -> None:
    result = check(frame(bad), ValidateParams(min_examples=5), REDACT)
    assert not result.success
    assert [o.name for o in result.failed] == [failed]
    message = error_message(result)
    assert f"{failed}:" in message
    assert f"{where}: " in message
    (outcome,) = result.failed
    assert outcome.unexpected_count == (2 if failed == "unique_id" else 1)
    assert any(row.where() == where for row in outcome.rows)


def test_records_with_nothing_to_train_on_break_the_contract_under_replies() -> None:
    no_reply = Record(
        messages=(("user", "Is anyone there?"),), source="chat.jsonl", line=6, format="chat_jsonl"
    )
    left_out = Record(
        messages=(("user", "Draft a refund note."), ("assistant", "A draft."), ("user", "More?")),
        source="chat.jsonl",
        line=7,
        format="chat_jsonl",
        weights=(None, 0, None),
    )
    kept = Record(
        messages=(("user", "Draft a note."), ("assistant", "Draft."), ("user", "Final?")),
        source="chat.jsonl",
        line=8,
        format="chat_jsonl",
        weights=(None, 1, None),
    )
    df = pd.concat([frame(), pd.DataFrame([r.to_row() for r in (no_reply, left_out, kept)])])
    cfg = ValidateParams(min_examples=5)

    result = check(df, cfg, REDACT, loss_on="replies")

    assert [o.name for o in result.failed] == ["trains_on_a_reply"]
    (outcome,) = result.failed
    assert outcome.unexpected_count == 2  # the document of GOOD trains on its text
    assert {row.where() for row in outcome.rows} == {"chat.jsonl:6", "chat.jsonl:7"}
    message = error_message(result)
    assert "2 record(s) give train nothing to train on under train.loss_on: replies" in message
    assert "set train.loss_on: all" in message
    # Under loss_on all every token trains: the same records keep the contract.
    assert check(df, cfg, REDACT, loss_on="all").success


def test_duplicate_names_both_copies() -> None:
    result = check(frame(GOOD[1]), ValidateParams(min_examples=5), REDACT)
    assert "chat.jsonl:2: Be brief. Refund status? Sent today." in error_message(result)


def test_snippets_mask_the_personal_data_they_report() -> None:
    bad = (("user", "Mail me at jane.doe@example.com"), ("assistant", "Will do."))
    message = error_message(check(frame(bad), ValidateParams(min_examples=5), REDACT))
    assert "chat.jsonl:6: Mail me at [EMAIL] Will do." in message
    assert "jane.doe" not in message


def test_null_text_is_stopped() -> None:
    df = frame()
    df.loc[2, "text"] = None
    result = check(df, ValidateParams(min_examples=5), REDACT)
    assert "text_not_null" in [o.name for o in result.failed]
    assert "chat.jsonl:3: (no text)" in error_message(result)


def test_too_few_records_says_which_setting_to_lower() -> None:
    result = check(frame(), ValidateParams(min_examples=20), REDACT)
    assert [o.name for o in result.failed] == ["min_examples"]
    message = error_message(result)
    assert "5 record(s)" in message
    assert "lower validate.min_examples in params.yaml" in message


def test_records_without_the_contract_columns_are_refused() -> None:
    with pytest.raises(DataValidationError, match="roles"):
        check(frame().drop(columns=["roles"]), ValidateParams(min_examples=1), REDACT)


@pytest.mark.slow
def test_run_passes_writes_reports_and_logs_to_mlflow(prepared: Params) -> None:
    manifest = prepared.paths.clean / "manifest.json"
    manifest.write_text(json.dumps({"data_version": "ab" * 32, "n_records": 80}))
    # What hygiene leaves beside the clean records: logged next to the validation report.
    (prepared.paths.reports).mkdir(parents=True, exist_ok=True)
    (prepared.paths.reports / "hygiene.json").write_text("{}")

    result = run(prepared)

    assert result.success and result.failed == ()
    report = json.loads(result.report.read_text())
    assert report["success"] is True
    assert report["data_version"] == "ab" * 32
    assert report["n_records"] == 80
    assert {e["name"] for e in report["expectations"]} >= {"min_examples", "unique_id", "no_email"}
    assert (result.docs / "index.html").is_file()
    assert list(result.docs.glob("validations/**/*.html"))

    from mlflow.tracking import MlflowClient

    (mlrun,) = mlflow_runs(prepared)
    assert mlrun.info.run_id == result.run_id
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.metrics["validation_success"] == 1.0
    assert mlrun.data.tags["data_version"] == "ab" * 32
    client = MlflowClient(prepared.tracking.uri)
    logged = {a.path for a in client.list_artifacts(result.run_id, "validation")}
    assert logged == {
        "validation/validate.json",
        "validation/validate_docs",
        "validation/hygiene.json",
    }
    docs = {a.path for a in client.list_artifacts(result.run_id, "validation/validate_docs")}
    assert "validation/validate_docs/index.html" in docs


@pytest.mark.slow
def test_run_stops_bad_data_and_marks_the_mlflow_run_failed(prepared: Params) -> None:
    path = prepared.paths.clean / "records.parquet"
    rows = read_records(path).to_pylist()
    bad = Record(
        messages=(("assistant", "Hello!"), ("user", "Write to bob@example.org")),
        source="export.jsonl",
        line=41,
        format="chat_jsonl",
    ).to_row()
    write_records([*rows, rows[0], bad], path)

    with pytest.raises(DataValidationError) as info:
        run(prepared)

    message = str(info.value)
    for name in ("unique_id", "role_order", "no_email"):
        assert f"  {name}: " in message
    assert "fixture.jsonl:1: " in message
    assert "export.jsonl:41: Hello! Write to [EMAIL]" in message
    assert "bob@example.org" not in message
    report = json.loads((prepared.paths.reports / "validate.json").read_text())
    assert report["success"] is False
    assert set(report["failed"]) == {"unique_id", "role_order", "no_email"}
    role_order = next(e for e in report["expectations"] if e["name"] == "role_order")
    assert role_order["failed_rows"][0]["source"] == "export.jsonl"
    assert role_order["failed_rows"][0]["line"] == 41
    assert role_order["failed_rows"][0]["id"] == bad["id"]
    assert (prepared.paths.reports / "validate_docs" / "index.html").is_file()
    (mlrun,) = mlflow_runs(prepared)
    assert mlrun.info.status == "FAILED"
    assert mlrun.data.metrics["validation_success"] == 0.0


def _represented(categories: list[str], texts: list[str] | None = None) -> pd.DataFrame:
    """Records from chat.jsonl with a meta category each, and English (or given) texts."""
    rows = []
    for i, category in enumerate(categories):
        text = texts[i] if texts else f"My {category} order number {i} arrived late, please help."
        rows.append(
            Record(
                messages=(("user", text), ("assistant", "I have looked into it for you.")),
                source="chat.jsonl",
                line=i + 1,
                format="chat_jsonl",
                meta={"category": category},
            ).to_row()
        )
    return pd.DataFrame(rows)


def test_representation_passes_on_balanced_english_records() -> None:
    df = _represented(["billing", "shipping", "returns", "setup"] * 10)
    result = check(
        df, ValidateParams(min_examples=5), REDACT, representation=RepresentationParams()
    )
    assert result.success, error_message(result)
    share = next(o for o in result.expectations if o.name == "category_share")
    assert share.observed_value == {c: 0.25 for c in ("billing", "returns", "setup", "shipping")}
    languages = next(o for o in result.expectations if o.name == "language_share")
    assert languages.observed_value == {"en": 40}


def test_a_rare_category_fails_with_its_share_and_the_setting() -> None:
    df = _represented(["billing"] * 60 + ["shipping"] * 39 + ["warranty"])
    result = check(
        df, ValidateParams(min_examples=5), REDACT, representation=RepresentationParams()
    )
    assert [o.name for o in result.failed] == ["category_share"]
    message = error_message(result)
    assert "category 'warranty' holds 1.00% (1 of the 100 records with a meta.category)" in message
    assert "representation.min_category_share=2.0%" in message


def test_records_without_categories_skip_the_category_check() -> None:
    result = check(
        frame(), ValidateParams(min_examples=5), REDACT, representation=RepresentationParams()
    )
    names = [o.name for o in result.expectations]
    assert "category_share" not in names and "language_share" in names


def test_too_much_text_in_other_languages_fails_and_shows_where() -> None:
    spanish = "Hola, mi pedido todavía no ha llegado. ¿Dónde está mi termostato nuevo?"
    texts = [f"My thermostat order number {i} arrived late, please help." for i in range(8)]
    df = _represented(["billing"] * 10, [*texts, spanish, spanish + " Gracias."])
    hyg = RepresentationParams(min_language_share=0.9)
    result = check(df, ValidateParams(min_examples=5), REDACT, representation=hyg)
    assert [o.name for o in result.failed] == ["language_share"]
    message = error_message(result)
    assert "only 80.0% of 10 sampled records are in en" in message
    assert "others: es 2" in message
    assert "chat.jsonl:9: Hola, mi pedido" in message
    # Declaring the language accepted makes the same records pass.
    ok = check(
        df,
        ValidateParams(min_examples=5),
        REDACT,
        representation=RepresentationParams(languages=("en", "es")),
    )
    assert ok.success, error_message(ok)
