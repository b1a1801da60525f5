"""The monitoring page (`retune monitor`, and with every drift check) as a person sees it: opened
in a real headless Chromium, its plots drawn, its tables true to the store and the registry."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from retune.config import Params, to_plain
from retune.online.feedback import RATING_COLUMNS, TRAFFIC_COLUMNS, FeedbackStore
from retune.online.monitor import PLOTS, DriftRun, MonitorData, bucket_for, render
from retune.release.registry import Event
from tests.servers import auth

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless and offline: no sandbox (containers), no GPU, nothing fetched in the background.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TAB_BLUE = (31, 119, 180)  # matplotlib's first colour: the oldest version's lines


@contextmanager
def opened(path: Path) -> Iterator[Any]:
    """`path` opened in headless Chromium (a Playwright page). On leaving, checks the page
    loaded nothing but itself and logged no error."""
    if CHROMIUM is None:
        if os.environ.get("RETUNE_REQUIRE_BROWSER"):
            pytest.fail("RETUNE_REQUIRE_BROWSER is set but no chromium is on PATH")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requested: list[str] = []
            errors: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(path.as_uri(), wait_until="load")
            yield page
            assert requested == [path.as_uri()], "the page must be self-contained"
            assert errors == []
        finally:
            browser.close()


def _painted(page: Any, selector: str) -> set[tuple[int, int, int]]:
    """The colours the browser painted for `selector` (a screenshot of it)."""
    from PIL import Image

    image = Image.open(io.BytesIO(page.locator(selector).screenshot())).convert("RGB")
    return {colour for _, colour in image.getcolors(maxcolors=1 << 20) or []}


def _near(colours: set[tuple[int, int, int]], target: tuple[int, int, int]) -> bool:
    return any(sum(abs(a - b) for a, b in zip(c, target, strict=True)) <= 12 for c in colours)


def _lines(page: Any, plot: str, colour: str, width: float = 1.4) -> int:
    """Data lines (and their legend samples) of `colour` drawn in `plot`'s SVG."""
    return int(
        page.locator(
            f'#plot-{plot} svg path[style*="stroke: {colour}; stroke-width: {width:g}"]'
        ).count()
    )


def _rows(page: Any, table: str) -> list[list[str]]:
    return [row.locator("td").all_inner_texts() for row in page.locator(f"#{table} tbody tr").all()]


def synthetic(now: datetime) -> MonitorData:
    """Three days of traffic: v1, then v2 promoted a day ago (slower, rated worse); three
    drift checks, the newest finding drift; the two promotions."""
    rng = np.random.default_rng(0)
    since = now - timedelta(days=3)
    promoted = now - timedelta(days=1)
    times = pd.date_range(since + timedelta(minutes=5), now - timedelta(minutes=5), periods=600)
    version = np.where(times < promoted, "1", "2")
    traffic = pd.DataFrame(
        {
            "created_at": times,
            "model_version": version,
            "latency_ms": np.where(version == "1", 40.0, 90.0) + rng.gamma(2.0, 5.0, len(times)),
            "completion_tokens": rng.integers(5, 33, len(times)),
        },
        columns=list(TRAFFIC_COLUMNS),
    )
    rated = traffic.iloc[::3]
    negative = rng.random(len(rated)) < np.where(rated["model_version"] == "1", 0.1, 0.5)
    ratings = pd.DataFrame(
        {
            "created_at": rated["created_at"].to_numpy(),
            "model_version": rated["model_version"].to_numpy(),
            "rating": np.where(negative, "down", "up"),
            "score": np.nan,
            "negative": negative,
        },
        columns=list(RATING_COLUMNS),
    )
    ratings["created_at"] = pd.to_datetime(ratings["created_at"], utc=True)

    def check(status: str, effect: float, p: float) -> dict[str, Any]:
        return {
            "status": status,
            "effect": effect,
            "p_value": p,
            "statistic": effect,
            "n_current": 100.0,
            "n_reference": 200.0,
        }

    runs = [
        DriftRun(
            run_id=f"run{i}",
            at=now - timedelta(hours=h),
            production_version=v,
            status=status,
            acted_on=status == "drift",
            checks={
                "quality": check(status, effect, p),
                "perplexity": check("no drift", 0.05, 0.4),
                "prompt_length": check("no drift", 0.04, 0.6),
            },
        )
        for i, (h, v, status, effect, p) in enumerate(
            [
                (1, "2", "drift", 0.31, 1e-6),
                (20, "2", "no drift", 0.02, 0.3),
                (40, "1", "no drift", -0.01, 0.7),
            ]
        )
    ]
    moves = [
        Event(
            promoted,
            "support-bot",
            "production",
            "promote",
            1,
            2,
            False,
            "gate",
            "<script>alert(1)</script> beat v1",
        ),
        Event(
            now - timedelta(days=5),
            "support-bot",
            "production",
            "promote",
            None,
            1,
            False,
            "alice",
            "first version",
        ),
    ]
    return MonitorData(
        model_name="support-bot",
        generated_at=now,
        since=since,
        production_version=2,
        traffic=traffic,
        ratings=ratings,
        drift_runs=runs,
        moves=moves,
        points=48,
    )


def test_the_page_draws_traffic_latency_ratings_and_drift_per_version_in_a_browser(
    tmp_path: Path,
) -> None:
    data = synthetic(datetime(2026, 11, 30, 12, 0, tzinfo=UTC))
    page_file = tmp_path / "monitor.html"
    page_file.write_text(render(data))

    with opened(page_file) as page:
        assert page.title() == "retune monitor: support-bot"
        assert page.locator("#production").inner_text() == "v2"
        for name in PLOTS:
            svg = page.locator(f"#plot-{name} svg")
            assert svg.count() == 1, name
            box = svg.bounding_box()
            assert box is not None and box["width"] > 900 and box["height"] > 150, (name, box)
        # Lines per version, and where production moved, drawn and labelled.
        legend = page.locator("#plot-traffic svg text").all_text_contents()
        assert {"v1", "v2", "promote v2"} <= {t.strip() for t in legend}
        assert "v2 p95" in (page.locator("#plot-traffic svg").text_content() or "")
        # Per version: its requests line and its p50 line, each with its legend sample.
        assert _lines(page, "traffic", "#1f77b4") == _lines(page, "traffic", "#ff7f0e") == 4
        assert _lines(page, "ratings", "#1f77b4") == 2  # v1's negative share, and its legend
        assert _lines(page, "drift", "#d62728", 1.2) == 2  # quality's effect, and its legend
        requests_colours = _painted(page, "#plot-traffic")
        assert len(requests_colours) > 30 and _near(requests_colours, TAB_BLUE)
        ratings_colours = _painted(page, "#plot-ratings")
        assert _near(ratings_colours, (214, 39, 40)) and _near(ratings_colours, (44, 160, 44))

        versions = _rows(page, "versions")
        assert [r[0] for r in versions] == ["v2 (production)", "v1"]
        counts = data.traffic["model_version"].value_counts()
        assert [int(r[1]) for r in versions] == [counts["2"], counts["1"]]
        share = data.ratings.groupby("model_version")["negative"].mean()
        assert versions[0][6] == f"{share['2']:.0%}"
        assert int(versions[0][2]) > int(versions[1][2])  # v2's median latency is higher

        checks = _rows(page, "drift-checks")
        assert [r[-1] for r in checks] == ["run0", "run1", "run2"]  # newest first
        assert checks[0][2] == "drift" and checks[0][3].startswith("drift; effect 0.31, p 1e-06")
        assert checks[0][-2] == "yes" and checks[1][-2] == "no"

        moves = _rows(page, "alias-moves")
        assert [(r[1], r[3], r[4], r[5]) for r in moves] == [
            ("production", "v1", "v2", "gate"),
            ("production", "-", "v1", "alice"),
        ]
        # What people typed is shown as text, never run.
        assert moves[0][6] == "<script>alert(1)</script> beat v1"
        assert page.locator("script").count() == 0


def test_an_empty_store_gives_a_page_that_says_what_to_do(tmp_path: Path) -> None:
    now = datetime(2026, 11, 30, tzinfo=UTC)
    empty = MonitorData(
        model_name="support-bot",
        generated_at=now,
        since=now - timedelta(days=14),
        production_version=None,
        traffic=pd.DataFrame(columns=list(TRAFFIC_COLUMNS)),
        ratings=pd.DataFrame(columns=list(RATING_COLUMNS)),
        drift_runs=[],
        moves=[],
    )
    page = render(empty)
    assert ">not set<" in page
    assert "No requests or ratings in the last 14 days: serve it with `retune serve`." in page
    assert "No drift check yet: run `retune drift`." in page
    assert "no requests in the last 14 days" in page and "no ratings in the last 14 days" in page
    assert page.count("<svg") == 2  # traffic and ratings: no drift plot before a check


def test_odd_rows_render_a_single_request_a_nan_latency_a_named_version_another_alias() -> None:
    now = datetime(2026, 11, 30, tzinfo=UTC)
    at = pd.to_datetime([now - timedelta(hours=1), now - timedelta(minutes=30)], utc=True)
    data = MonitorData(
        model_name="o'brien <bot>",
        generated_at=now,
        since=now - timedelta(days=1),
        production_version=3,
        traffic=pd.DataFrame(
            {
                "created_at": at,
                "model_version": ["3", "canary"],
                "latency_ms": [float("nan"), 12.0],
                "completion_tokens": [4, 5],
            }
        ),
        ratings=pd.DataFrame(
            {
                "created_at": at[:1],
                "model_version": ["3"],
                "rating": ["down"],
                "score": [float("nan")],
                "negative": [True],
            }
        ),
        drift_runs=[DriftRun("r1", now, "none", "not enough data", False, {})],
        moves=[
            Event(
                now - timedelta(hours=2),
                "o'brien <bot>",
                "candidate",
                "propose",
                None,
                3,
                False,
                "gate",
                "",
            )
        ],
    )
    page = render(data)
    assert "<title>retune monitor: o&#x27;brien &lt;bot&gt;</title>" in page
    versions = page.split('<table id="versions">')[1].split("</table>")[0]
    assert versions.index("v3 (production)") < versions.index("vcanary")  # numbers first
    assert "<td>-</td>" in versions  # v3's latency is unknown, not 'nan'
    assert "<td>100%</td>" in versions
    drift = page.split('<table id="drift-checks">')[1]
    assert "<td>-</td><td>not enough data</td>" in drift  # no production then
    assert "<td>candidate</td><td>propose</td>" in page
    assert "propose v3" not in page  # only production's moves are drawn on the time plots


@pytest.mark.parametrize(
    ("span", "points", "freq"),
    [
        (timedelta(minutes=30), 48, "1min"),
        (timedelta(hours=6), 48, "15min"),
        (timedelta(days=14), 48, "12h"),  # the defaults: 28 points
        (timedelta(days=14), 400, "1h"),
        (timedelta(days=2000), 48, "7D"),  # the coarsest, even past the limit
    ],
)
def test_time_buckets_are_the_finest_within_the_point_limit(
    span: timedelta, points: int, freq: str
) -> None:
    assert bucket_for(span, points)[0] == freq


def test_retune_monitor_shows_what_the_server_served_and_where_production_moved(
    registered: Params, server: tuple[str, FeedbackStore], tmp_path: Path
) -> None:
    """Real requests through the server and real ratings, then `retune monitor`: the page
    counts them for the version served and lists the promotion the registry recorded."""
    url, store = server
    ids = []
    for i in range(6):
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": "retune-test",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": f"question {i}"}],
            },
            headers=auth(),
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        ids.append(answer.json()["id"])
    for interaction, rating in zip(ids, ["up", "up", "down", "up", "down"], strict=False):
        rated = httpx.post(
            f"{url}/v1/feedback", json={"id": interaction, "rating": rating}, headers=auth()
        )
        assert rated.status_code == 201, rated.text
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_plain(registered)))

    result = CliRunner().invoke(app, ["monitor", "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    page_file = registered.paths.reports / "monitor.html"
    assert f"-> {page_file}" in result.output

    with opened(page_file) as page:
        assert page.locator("#production").inner_text() == "v1"
        (row,) = _rows(page, "versions")
        served = store.traffic_frame(
            model_name="retune-test", since=datetime(2000, 1, 1, tzinfo=UTC)
        )
        assert row[0] == "v1 (production)" and int(row[1]) == len(served) >= 6
        assert int(row[5]) == 5 and row[6] == "40%"
        moves = _rows(page, "alias-moves")
        assert [(m[1], m[2], m[4], m[5], m[6]) for m in moves] == [
            ("production", "promote", "v1", "test", "test")
        ]
        assert _lines(page, "traffic", "#1f77b4") == 4  # v1: requests and p50 lines
        assert _lines(page, "ratings", "#1f77b4") == 2  # v1's negative share
        assert page.locator("#plot-drift").count() == 0  # no drift check ran on this store
        assert "No drift check yet: run `retune drift`." in page.locator("main").inner_text()
        assert "no requests" not in page.locator("#plot-traffic").inner_text()
