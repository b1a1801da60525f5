"""Each benchmark of issue 6 (data_prep, overhead, reruns) once at its smallest size, and the
report: they must keep producing their figures. No timing is asserted (benchmarks are not
tests); what is asserted is what the figures stand for (e.g. a param change reruns no training).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import (
    busy_start,
    data_prep,
    interrupt,
    malformed,
    overhead,
    reruns,
    run_all,
    scaleout,
    serve,
)
from benchmarks.report import meets, write_report


def rows_of(out: Path, name: str) -> dict[str, dict[str, Any]]:
    result = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
    assert result["name"] == name
    assert result["command"].startswith(f"python -m benchmarks.{name}")
    assert result["machine"] and result["commit"]
    return {r["metric"]: r for r in result["rows"]}


def test_report_has_a_table_per_benchmark_with_machine_commit_and_command(
    tmp_path: Path,
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    figure = {"metric": "noop", "value": 4.2, "unit": "s", "target": "<= 3", "note": "a|b"}
    (results / "reruns.json").write_text(
        json.dumps({"name": "reruns", "command": "python -m benchmarks.reruns", "rows": [figure]})
    )
    (results / "notes.txt").write_text("not a result")
    (results / "broken.json").write_text("{")
    output = write_report(results, tmp_path / "BENCHMARKS.md")
    text = output.read_text(encoding="utf-8")
    assert "## reruns" in text
    assert "`python -m benchmarks.reruns`" in text
    # A result that does not name its machine or commit gets this machine's, marked as such.
    assert "(when this report was written)" in text
    assert "| noop | 4.20 | s | <= 3 | **no** | a\\|b |" in text
    assert "not tests" in text and "make bench" in text


def test_targets_are_read_from_their_comparison() -> None:
    assert meets(2.0, "<= 3") == "yes"
    assert meets(12.0, "<= 10 (default config)") == "**no**"
    assert meets(1.05, ">= 1.0") == "yes"
    assert meets(0.0, "== 0") == "yes"
    assert meets(5.0, "equal or better") == ""
    assert meets(5.0, None) == ""


def test_run_all_skips_a_missing_benchmark_and_still_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_all.main(["--only", "no_such_benchmark", "--out", str(tmp_path)]) == 0
    assert "benchmarks/no_such_benchmark.py not found, skipped" in capsys.readouterr().out
    assert "No results yet" in (tmp_path / "BENCHMARKS.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_data_prep_smoke_times_every_stage(tmp_path: Path) -> None:
    assert data_prep.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = rows_of(tmp_path, "data_prep")
    for stage in data_prep.stages():
        assert rows[f"{stage}@1k"]["value"] > 0
        assert rows[f"{stage}_peak_rss@1k"]["value"] > 0
    assert rows["total_time@1k"]["value"] > 0


@pytest.mark.slow
def test_overhead_smoke_splits_the_run_into_compute_and_overhead(tmp_path: Path) -> None:
    assert overhead.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = rows_of(tmp_path, "overhead")
    assert 0 < rows["compute"]["value"] < rows["make_run_wall"]["value"]
    assert 0 < rows["overhead_share"]["value"] < 100
    assert rows["stage_train_overhead"]["value"] >= 0


@pytest.mark.slow
def test_reruns_smoke_reruns_only_what_a_param_change_affects(tmp_path: Path) -> None:
    assert reruns.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = rows_of(tmp_path, "reruns")
    assert "stages run: none" in rows["dvc_repro_noop"]["note"]
    ran = rows["dvc_repro_one_param"]["note"].split("ran ", 1)[1].split(", ")
    assert "evaluate" in ran
    assert not {"ingest", "validate", "split", "train"} & set(ran)
    assert rows["flow_rerun_unchanged"]["value"] > 0


def test_malformed_runs_retune_ingest_on_every_kind_without_a_traceback(tmp_path: Path) -> None:
    assert malformed.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = rows_of(tmp_path, "malformed")
    assert rows["kinds"]["value"] >= 25
    assert rows["exit_code"]["value"] == rows["tracebacks"]["value"] == 0
    assert rows["mismatches"]["value"] == rows["leaks"]["value"] == 0
    assert rows["rows_in"]["value"] == rows["accepted"]["value"] + rows["quarantined"]["value"]
    assert rows["deep_5000: deep_5000.jsonl"]["note"] == "accepted 2, quarantined 1 (too_deep)"


@pytest.mark.slow
def test_serve_smoke_streams_batches_and_stores_every_rating(tmp_path: Path) -> None:
    assert serve.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = rows_of(tmp_path, "serve")
    assert rows["smoke_completion_errors"]["value"] == 0
    assert rows["smoke_streams_without_text"]["value"] == 0
    assert rows["smoke_completion_tokens_mean"]["value"] == 24  # end-of-turn off: full length
    assert 0 < rows["smoke_ttft_p50"]["value"] <= rows["smoke_streamed_latency_p50"]["value"]
    assert rows["smoke_feedback_sent"]["value"] > 0
    assert rows["smoke_feedback_lost"]["value"] == rows["smoke_feedback_errors"]["value"] == 0


@pytest.mark.slow
def test_scaleout_smoke_times_folds_on_each_runner_and_a_search(tmp_path: Path) -> None:
    cwd = Path.cwd()
    assert scaleout.main(["--smoke", "--trials", "3", "--out", str(tmp_path)]) == 0
    assert Path.cwd() == cwd  # it worked in a scratch folder, and came back
    rows = rows_of(tmp_path, "scaleout")
    assert rows["ddp_1_tokens_per_s"]["value"] > 0 and rows["ddp_2_tokens_per_s"]["value"] > 0
    assert rows["ddp_2_speedup"]["value"] > 0
    assert rows["cv_sequential_wall"]["value"] > 0 and rows["cv_process_wall"]["value"] > 0
    assert rows["cv_process_perplexity_diff"]["value"] < 0.1  # percent
    assert rows["tune_trials"]["value"] == 3
    assert rows["tune_best_eval_loss"]["value"] <= rows["tune_baseline_eval_loss"]["value"]


@pytest.mark.slow
def test_busy_start_runs_a_first_run_with_every_core_busy(tmp_path: Path) -> None:
    assert busy_start.main(["--runs", "1", "--smoke", "--out", str(tmp_path)]) == 0
    rows = rows_of(tmp_path, "busy_start")
    assert rows["runs_passed"]["value"] == 1
    assert rows["processes_left_behind"]["value"] == rows["tracebacks"]["value"] == 0
    assert rows["prefect_wait_max"]["value"] > 0


@pytest.mark.slow
def test_interrupt_smoke_kills_a_real_run_and_counts_what_is_left(tmp_path: Path) -> None:
    assert interrupt.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = rows_of(tmp_path, "interrupt")
    assert rows["left_behind_SIGKILL"]["value"] == 0
    # It was killed while the run and its Prefect server were both up.
    assert "2 processes in the run's session" in rows["left_behind_SIGKILL"]["note"]
