"""The monitoring view: one HTML page of how a registered model is doing in production.

Per model version, requests and latency over time; the rating mix over time; the newest drift
checks with their statistics; where `production` moved. `collect` gathers it at the edge (the
feedback store's traffic and ratings, without text; the drift experiment's runs; the registry's
alias history), `render` draws it: plots are inline SVG and the page has no script and loads
nothing, so it opens anywhere, offline, and travels as one MLflow artifact. `retune monitor`
writes it; every drift check logs it with its run.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retune.online.drift import ACTED_TAG, CHECKS, EXPERIMENT_SUFFIX, STATUS_TAG
from retune.release.registry import PRODUCTION

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from retune.config import Params
    from retune.release.registry import Event, Registry

# Bucket widths a time plot may use, finest first; the finest that gives at most
# `monitor.points` buckets over the shown span is used.
BUCKETS = (
    ("1min", timedelta(minutes=1)),
    ("5min", timedelta(minutes=5)),
    ("15min", timedelta(minutes=15)),
    ("1h", timedelta(hours=1)),
    ("3h", timedelta(hours=3)),
    ("6h", timedelta(hours=6)),
    ("12h", timedelta(hours=12)),
    ("1D", timedelta(days=1)),
    ("7D", timedelta(days=7)),
)
PLOTS = ("traffic", "ratings", "drift")
VERSION_COLUMNS = ("version", "requests", "p50 ms", "p95 ms", "tokens out", "ratings", "negative")


@dataclass(frozen=True)
class DriftRun:
    """One drift check as its MLflow run recorded it."""

    run_id: str
    at: datetime
    production_version: str
    status: str
    acted_on: bool
    # check name -> {"status", "effect", "p_value", "statistic", "n_current", "n_reference"}
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class MonitorData:
    model_name: str
    generated_at: datetime
    since: datetime
    production_version: int | None
    traffic: pd.DataFrame  # feedback.TRAFFIC_COLUMNS
    ratings: pd.DataFrame  # feedback.RATING_COLUMNS
    drift_runs: list[DriftRun]  # newest first
    moves: list[Event]  # newest first
    points: int = 48


def bucket_for(span: timedelta, points: int) -> tuple[str, timedelta]:
    """The finest of `BUCKETS` that cuts `span` into at most `points` buckets (the coarsest
    when none does)."""
    for freq, width in BUCKETS:
        if span / width <= points:
            return freq, width
    return BUCKETS[-1]


def drift_runs(registry: Registry, limit: int) -> list[DriftRun]:
    """The newest `limit` drift checks of the registry's model, newest first."""
    exp = registry.client.get_experiment_by_name(
        f"{registry.tracking.experiment}-{EXPERIMENT_SUFFIX}"
    )
    if exp is None:
        return []
    runs = registry.client.search_runs(
        [exp.experiment_id],
        filter_string=f"params.model_name = '{registry.model_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    )
    out = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        checks = {}
        for name in CHECKS:
            if f"drift.{name}" not in tags:
                continue
            checks[name] = {"status": tags[f"drift.{name}"]} | {
                key: metrics.get(f"{name}.{key}")
                for key in ("effect", "p_value", "statistic", "n_current", "n_reference")
            }
        out.append(
            DriftRun(
                run_id=run.info.run_id,
                at=datetime.fromtimestamp(run.info.start_time / 1000, UTC),
                production_version=run.data.params.get("production_version", "none"),
                status=tags.get(STATUS_TAG, "unknown"),
                acted_on=tags.get(ACTED_TAG) == "true",
                checks=checks,
            )
        )
    return out


def collect(
    params: Params, *, registry: Registry | None = None, now: datetime | None = None
) -> MonitorData:
    """Edge: what the page shows of `register.model_name`, read from the feedback store
    (`feedback.store_url`), the registry and the drift experiment in `tracking.uri`."""
    from retune.online.feedback import FeedbackStore
    from retune.release.registry import Registry

    name = params.register.model_name
    if registry is None:
        registry = Registry.open(params.tracking, name)
    now = now or datetime.now(UTC)
    now = now.astimezone(UTC)  # the store keeps UTC without a zone: compare in UTC
    since = now - timedelta(days=params.monitor.days)
    store = FeedbackStore.open(params.feedback.store_url)
    try:
        traffic = store.traffic_frame(model_name=name, since=since)
        ratings = store.ratings_frame(model_name=name, since=since)
    finally:
        store.close()
    return MonitorData(
        model_name=name,
        generated_at=now,
        since=since,
        production_version=registry.production(),
        traffic=traffic,
        ratings=ratings,
        drift_runs=drift_runs(registry, params.monitor.drift_checks),
        moves=registry.history(),
        points=params.monitor.points,
    )


def write(params: Params, path: Path, *, registry: Registry | None = None) -> Path:
    """Collect and render the page into `path`; return it."""
    page = render(collect(params, registry=registry))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- rendering


def _naive(when: Any) -> datetime:
    """A time as naive UTC."""
    import pandas as pd

    stamp = pd.Timestamp(when)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert(UTC).tz_localize(None)
    return stamp.to_pydatetime()


def _x(when: Any) -> float:
    """A time on matplotlib's date axis (days since its epoch, UTC)."""
    from matplotlib import dates

    return float(dates.date2num(_naive(when)))


def _xs(times: Any) -> list[float]:
    return [_x(t) for t in times]


def _version_key(version: str) -> tuple[bool, int, str]:
    """Registry versions (numbers) in numeric order, anything else after them."""
    number = version.isascii() and version.isdecimal()
    return (not number, int(version) if number else 0, version)


def _colours(versions: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    ordered = sorted(set(versions), key=_version_key)
    return {v: palette(i % palette.N) for i, v in enumerate(ordered)}


def _svg(fig: Figure, name: str) -> str:
    """The figure as an inline <svg> element, its text kept as text."""
    from matplotlib import rc_context

    buf = io.StringIO()
    # A salt per plot keeps the clip-path ids of several inline SVGs on one page apart.
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": f"retune-{name}"}):
        fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _new_figure(rows: int = 1) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _date_axis(ax: Axes, label: str | None) -> None:
    from matplotlib import dates

    locator = dates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator))
    if label:
        ax.set_xlabel(label)
    ax.grid(alpha=0.3)


def _time_axis(ax: Axes, data: MonitorData, label: bool = True) -> None:
    """The shown period, `monitor.days` up to now, as the x axis."""
    ax.set_xlim(_x(data.since), _x(data.generated_at))
    _date_axis(ax, "time (UTC)" if label else None)


def _mark_moves(ax: Axes, data: MonitorData) -> None:
    """A dotted line where `production` moved, labelled with the version it moved to."""
    for event in data.moves:
        if event.alias != PRODUCTION or not data.since <= event.when <= data.generated_at:
            continue
        x = _x(event.when)
        ax.axvline(x, color="0.35", ls=":", lw=1)
        ax.annotate(
            f"{event.kind} v{event.to_version}",
            (x, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2),
            textcoords="offset points",
            fontsize=7,
            va="top",
            color="0.25",
        )


def _headroom(ax: Axes, top: float) -> None:
    """From 0 to a third above `top`: room for the legend above the data."""
    ax.set_ylim(0, top * 1.35 if top > 0 else 1)


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _bucketed(frame: pd.DataFrame, data: MonitorData) -> tuple[pd.DataFrame, timedelta]:
    freq, width = bucket_for(data.generated_at - data.since, data.points)
    out = frame.copy()
    out["bucket"] = out["created_at"].dt.floor(freq)
    out["model_version"] = out["model_version"].astype(str)
    return out, width


def _version_lines(
    ax: Axes, values: pd.Series, colours: dict[str, Any], suffix: str = "", **style: Any
) -> None:
    """A line per model version of `values` (indexed by version, then time bucket)."""
    for version, series in values.groupby(level=0):
        x = _xs(series.index.get_level_values("bucket"))
        label = f"v{version}{suffix}"
        ax.plot(x, series.to_numpy(dtype=float), color=colours[str(version)], label=label, **style)


def traffic_plot(data: MonitorData, colours: dict[str, Any]) -> str:
    """Top: requests per time bucket; bottom: p50 (solid) and p95 (dashed) latency; a line
    per model version."""
    fig, (requests_ax, latency_ax) = _new_figure(rows=2)
    if data.traffic.empty:
        for ax in (requests_ax, latency_ax):
            _empty(ax, f"no requests in the last {_days(data)}")
    else:
        frame, width = _bucketed(data.traffic, data)
        by_bucket = frame.groupby(["model_version", "bucket"])
        _version_lines(requests_ax, by_bucket.size(), colours, marker="o", ms=3, lw=1.4)
        requests_ax.legend(fontsize=8, loc="upper left", title="version", title_fontsize=8)
        requests_ax.set_ylabel(f"requests per {_width(width)}")
        quantiles = by_bucket["latency_ms"].quantile([0.5, 0.95]).unstack()
        _version_lines(latency_ax, quantiles[0.5], colours, " p50", marker="o", ms=3, lw=1.4)
        _version_lines(latency_ax, quantiles[0.95], colours, " p95", ls="--", lw=1.1)
        latency_ax.legend(fontsize=8, loc="upper left", ncols=2)
        latency_ax.set_ylabel("latency (ms)")
        _headroom(requests_ax, float(by_bucket.size().max()))
        _headroom(latency_ax, float(quantiles[0.95].max()))
    _time_axis(requests_ax, data, label=False)
    _time_axis(latency_ax, data)
    for ax in (requests_ax, latency_ax):
        _mark_moves(ax, data)
    requests_ax.set_title("Requests over time, per model version")
    latency_ax.set_title("Latency: p50 (solid) and p95 (dashed), per model version")
    return _svg(fig, "traffic")


def ratings_plot(data: MonitorData, colours: dict[str, Any]) -> str:
    """Top: positive and negative ratings per bucket (stacked); bottom: the negative share
    per bucket and model version."""

    fig, (counts_ax, share_ax) = _new_figure(rows=2)
    if data.ratings.empty:
        _empty(counts_ax, f"no ratings in the last {_days(data)}")
        _empty(share_ax, "no ratings")
    else:
        frame, width = _bucketed(data.ratings, data)
        mix = frame.groupby("bucket")["negative"].agg(["sum", "count"])
        x = _xs(mix.index)
        negative = mix["sum"].to_numpy(dtype=float)
        positive = mix["count"].to_numpy(dtype=float) - negative
        bar = width.total_seconds() / 86_400 * 0.85  # date axis units are days
        counts_ax.bar(x, positive, width=bar, align="edge", color="tab:green", label="positive")
        counts_ax.bar(
            x, negative, width=bar, align="edge", bottom=positive, color="tab:red", label="negative"
        )
        counts_ax.legend(fontsize=8, loc="upper left")
        _headroom(counts_ax, float(mix["count"].max()))
        counts_ax.set_ylabel(f"ratings per {_width(width)}")
        shares = frame.groupby(["model_version", "bucket"])["negative"].mean()
        _version_lines(share_ax, shares, colours, marker="o", ms=3, lw=1.4)
        share_ax.set_ylim(-0.02, 1.02)
        share_ax.legend(fontsize=8, loc="upper left", title="version", title_fontsize=8)
        share_ax.set_ylabel("negative share")
    _time_axis(counts_ax, data, label=False)
    _time_axis(share_ax, data)
    for ax in (counts_ax, share_ax):
        _mark_moves(ax, data)
    counts_ax.set_title("Rating mix over time (a 'down' rating or a score below 0.5 is negative)")
    return _svg(fig, "ratings")


def drift_plot(data: MonitorData) -> str:
    """Each check's effect over the drift checks (negative-share rise for quality, the KS
    distance D for the prompt checks); a filled red marker where it found drift."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.2), layout="constrained")
    ax = fig.subplots()
    runs = list(reversed(data.drift_runs))  # oldest first
    drawn = False
    for i, name in enumerate(CHECKS):
        points = [
            (_x(r.at), r.checks[name]["effect"], r.checks[name]["status"] == "drift")
            for r in runs
            if name in r.checks and r.checks[name].get("effect") is not None
        ]
        if not points:
            continue
        drawn = True
        colour = ("tab:red", "tab:purple", "tab:blue")[i % 3]
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            color=colour,
            lw=1.2,
            marker="o",
            ms=4,
            mfc="white",
            label=name.replace("_", " "),
        )
        drifted = [p for p in points if p[2]]
        if drifted:
            ax.scatter(
                [p[0] for p in drifted], [p[1] for p in drifted], s=40, color="red", zorder=3
            )
    if drawn:
        ax.legend(fontsize=8, loc="upper left")
        ax.set_ylabel("effect")
        ax.axhline(0, color="0.6", lw=0.8)
    else:
        _empty(ax, "no drift check measured anything yet (run `retune drift`)")
    _date_axis(ax, "drift check (UTC)")
    ax.set_title("Drift checks: each check's effect (filled red: drift)")
    return _svg(fig, "drift")


def _days(data: MonitorData) -> str:
    days = (data.generated_at - data.since) / timedelta(days=1)
    return f"{days:g} days"


def _width(width: timedelta) -> str:
    minutes = width / timedelta(minutes=1)
    if minutes < 60:
        return f"{minutes:g} min"
    hours = minutes / 60
    return f"{hours:g} h" if hours < 24 else f"{hours / 24:g} days"


def _num(value: Any, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(str(cell))}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def versions_table(data: MonitorData) -> str:
    """Per version: requests, latency, tokens, ratings and negative share in the period."""
    traffic = data.traffic.assign(model_version=data.traffic["model_version"].astype(str))
    ratings = data.ratings.assign(model_version=data.ratings["model_version"].astype(str))
    # Newest version first; names that are not numbers after them.
    versions = sorted(
        set(traffic["model_version"]) | set(ratings["model_version"]),
        key=lambda v: (_version_key(v)[0], -_version_key(v)[1], v),
    )
    rows = []
    for version in versions:
        t = traffic[traffic["model_version"] == version]
        r = ratings[ratings["model_version"] == version]
        latency = t["latency_ms"]
        role = " (production)" if version == str(data.production_version) else ""
        rows.append(
            [
                f"v{version}{role}",
                len(t),
                _num(latency.quantile(0.5) if len(t) else None, ".0f"),
                _num(latency.quantile(0.95) if len(t) else None, ".0f"),
                int(t["completion_tokens"].sum()),
                len(r),
                _num(float(r["negative"].mean()) if len(r) else None, ".0%"),
            ]
        )
    return _table(VERSION_COLUMNS, rows, "versions")


def drift_table(data: MonitorData) -> str:
    rows = []
    for run in data.drift_runs:
        production = run.production_version
        cells = [_stamp(run.at), f"v{production}" if production.isdecimal() else "-", run.status]
        for name in CHECKS:
            check = run.checks.get(name)
            if check is None:
                cells.append("-")
                continue
            n = _num(check.get("n_current"), ".0f")
            cells.append(
                f"{check['status']}; effect {_num(check.get('effect'))}, "
                f"p {_num(check.get('p_value'))}, n {n}"
            )
        cells += ["yes" if run.acted_on else "no", run.run_id]
        rows.append(cells)
    checks = [c.replace("_", " ") for c in CHECKS]
    return _table(
        ["checked", "production", "status", *checks, "acted on", "MLflow run"], rows, "drift-checks"
    )


def moves_table(data: MonitorData) -> str:
    rows = [
        [
            _stamp(e.when),
            e.alias,
            e.kind + (" (forced)" if e.forced else ""),
            f"v{e.from_version}" if e.from_version is not None else "-",
            f"v{e.to_version}",
            e.actor,
            e.why,
        ]
        for e in data.moves
    ]
    return _table(["when", "alias", "move", "from", "to", "by", "why"], rows, "alias-moves")


def _stamp(when: Any) -> str:
    return _naive(when).strftime("%Y-%m-%d %H:%M:%S UTC")


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 2px} h2{font-size:17px;margin:28px 0 8px}
.meta{color:#555;margin:0 0 12px}
figure{margin:0 0 16px;background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:8px}
figure svg{width:100%;height:auto;display:block}
figcaption{color:#555;font-size:12px;padding:4px 6px 0}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border:1px solid #dde1e6;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4} td:empty::after{content:"-"}
.empty{color:#666;font-style:italic}
"""


def _section(title: str, body: str, empty: bool, empty_text: str) -> str:
    content = f'<p class="empty">{html.escape(empty_text)}</p>' if empty else body
    return f"<section><h2>{html.escape(title)}</h2>{content}</section>"


def _figure(name: str, svg: str, caption: str) -> str:
    return (
        f'<figure id="plot-{name}" data-plot="{name}">{svg}'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def render(data: MonitorData) -> str:
    """The page: a self-contained HTML document (inline SVG plots, no script)."""
    colours = _colours(
        [*data.traffic["model_version"].astype(str), *data.ratings["model_version"].astype(str)]
    )
    production = f"v{data.production_version}" if data.production_version else "not set"
    name = html.escape(data.model_name)
    figures = {
        "traffic": (
            traffic_plot(data, colours),
            "Server-side time per request. Dotted lines: where production moved.",
        ),
        "ratings": (ratings_plot(data, colours), "Feedback by when it was given."),
        "drift": (
            drift_plot(data),
            "Effect: quality's rise in negative share, the prompt "
            "checks' Kolmogorov-Smirnov distance D.",
        ),
    }
    plots = {key: _figure(key, svg, caption) for key, (svg, caption) in figures.items()}
    no_traffic = data.traffic.empty and data.ratings.empty
    sections = [
        _section(
            "Model versions",
            versions_table(data),
            no_traffic,
            f"No requests or ratings in the last {_days(data)}: serve it with `retune serve`.",
        ),
        _section("Traffic", plots["traffic"], False, ""),
        _section("Ratings", plots["ratings"], False, ""),
        _section(
            f"Drift checks (newest {len(data.drift_runs)})",
            plots["drift"] + drift_table(data),
            not data.drift_runs,
            "No drift check yet: run `retune drift`.",
        ),
        _section(
            "Where the aliases moved",
            moves_table(data),
            not data.moves,
            "No alias moves recorded yet.",
        ),
    ]
    generated = _stamp(data.generated_at)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>retune monitor: {name}</title><style>{STYLE}</style></head>"
        f"<body><main><h1>{name}</h1>"
        f'<p class="meta">production: <strong id="production">{production}</strong> · '
        f"{len(data.traffic)} requests and {len(data.ratings)} ratings in the last "
        f"{_days(data)} · generated {generated}</p>" + "".join(sections) + "</main></body></html>\n"
    )
