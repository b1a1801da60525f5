"""The representation suite: Great Expectations over what the records represent (the share of
each category, the languages of a sample), checked on two small frames derived from the records,
as a second suite of the contract's context so the Data Docs show it next to the contract.
"""

from __future__ import annotations

from copy import copy
from typing import TYPE_CHECKING, Any

from retune.config import RepresentationParams
from retune.data.gx_batches import (
    ROW_KEYS,
    ExpectationOutcome,
    OffendingRow,
    Records,
    exception_message,
    index_triples,
    offending_rows,
    store_result,
)

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation

REPRESENTATION_SUITE = "retune_representation"  # its name in the Data Docs


def representation_frames(
    source: Records, hyg: RepresentationParams
) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """(categories, languages): each category of meta[representation.category_field] with its count
    and share of the records that have one (None when none has one, or the check is off); and
    the language sample (representation.language_sample records, fixed by id) with each record's
    detected language (None when no language is expected)."""
    import pandas as pd
    import pyarrow.compute as pc

    from retune.data import representation as rep

    categories = None
    if hyg.min_category_share > 0 and "meta" in source.columns and source.num_rows:
        values = rep.category_values(source.column("meta"), hyg.category_field)
        counts = pc.value_counts(values.drop_null())
        if len(counts):
            n = pc.sum(counts.field("counts")).as_py()
            categories = pd.DataFrame(
                {
                    "category": counts.field("values").to_pylist(),
                    "records": counts.field("counts").to_pylist(),
                }
            )
            categories["share"] = categories["records"] / n
            categories = categories.sort_values(["share", "category"]).reset_index(drop=True)
    languages = None
    if hyg.languages and source.num_rows:
        ids = source.column("id")
        sampled = ids.take(rep.sample_indices(ids, hyg.language_sample)).to_pylist()
        languages = source.with_ids(set(sampled)).sort_values(["source", "line"])
        languages = languages.reset_index(drop=True)
        languages["language"] = rep.detect_languages([t or "" for t in languages["text"]])
    return categories, languages


def representation_suite(
    hyg: RepresentationParams, categories: pd.DataFrame | None, languages: pd.DataFrame | None
) -> list[tuple[Expectation, str]]:
    """The representation expectations, each with the frame it reads ("categories" or
    "languages"); `meta["name"]` is retune's name for each."""
    import great_expectations as gx

    ge = gx.expectations
    out: list[tuple[Expectation, str]] = []
    if categories is not None:
        field = hyg.category_field
        out.append(
            (
                ge.ExpectColumnValuesToBeBetween(
                    column="share",
                    min_value=hyg.min_category_share,
                    meta={"name": "category_share"},
                    description=(
                        f"Every category (meta.{field}) holds at least "
                        f"{hyg.min_category_share:.1%} of the records that have one "
                        "(representation.min_category_share)."
                    ),
                ),
                "categories",
            )
        )
    if languages is not None:
        out.append(
            (
                ge.ExpectColumnValuesToBeInSet(
                    column="language",
                    value_set=list(hyg.languages),
                    mostly=hyg.min_language_share,
                    meta={"name": "language_share"},
                    description=(
                        f"At least {hyg.min_language_share:.0%} of {len(languages)} sampled "
                        f"records are in {', '.join(hyg.languages)} (representation.languages, "
                        "representation.min_language_share, representation.language_sample)."
                    ),
                ),
                "languages",
            )
        )
    return out


def representation_outcomes(
    context: Any, source: Records, hyg: RepresentationParams, rows_shown: int, run_name: str
) -> tuple[ExpectationOutcome, ...]:
    """Check what the records represent; the results are stored for the Data Docs as the
    suite REPRESENTATION_SUITE."""
    import great_expectations as gx

    categories, languages = representation_frames(source, hyg)
    expectations = representation_suite(hyg, categories, languages)
    if not expectations:
        return ()
    frames = {"categories": categories, "languages": languages}
    keys = {"categories": ["category"], "languages": ROW_KEYS}
    data = context.data_sources.add_pandas("representation")
    suite = context.suites.add(
        gx.ExpectationSuite(name=REPRESENTATION_SUITE, expectations=[e for e, _ in expectations])
    )
    results, outcomes = [], []
    for expectation, frame in zip(suite.expectations, (f for _, f in expectations), strict=True):
        df = frames[frame]
        batch = (
            data.add_dataframe_asset(frame)
            .add_batch_definition_whole_dataframe(frame)
            .get_batch(batch_parameters={"dataframe": df})
        )
        result = batch.validate(
            gx.ExpectationSuite(name=REPRESENTATION_SUITE, expectations=[copy(expectation)]),
            result_format={
                "result_format": "SUMMARY",
                "partial_unexpected_count": max(rows_shown, 1),
                "unexpected_index_column_names": keys[frame],
                "exclude_unexpected_values": True,
            },
        ).results[0]
        results.append(result)
        outcomes.append(_representation_outcome(result, df, hyg, rows_shown))
    store_result(context, suite, results, run_name)
    return tuple(outcomes)


def _representation_outcome(
    result: Any, df: pd.DataFrame, hyg: RepresentationParams, rows_shown: int
) -> ExpectationOutcome:
    config = result.expectation_config
    name = config.meta["name"]
    info = result.result or {}
    error = exception_message(result.exception_info)
    rows: tuple[OffendingRow, ...] = ()
    if name == "category_share":
        shares = dict(zip(df["category"], df["share"], strict=True))
        observed: Any = {str(k): round(float(v), 6) for k, v in shares.items()}
        total = int(df["records"].sum())
        rare = df[df["share"] < hyg.min_category_share]
        problem = "; ".join(
            f"category {r.category!r} holds {r.share:.2%} ({r.records} of the {total} records "
            f"with a meta.{hyg.category_field})"
            for r in rare.itertuples()
        )
        problem += (
            f", under representation.min_category_share={hyg.min_category_share:.1%}: add "
            "examples of it, merge it into a related category, or lower "
            "representation.min_category_share in params.yaml"
        )
    else:
        counts = df["language"].value_counts()
        observed = {str(k): int(v) for k, v in counts.items()}
        inside = int(df["language"].isin(list(hyg.languages)).sum())
        share = inside / len(df) if len(df) else 1.0
        others = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in set(hyg.languages))
        problem = (
            f"only {share:.1%} of {len(df)} sampled records are in "
            f"{', '.join(hyg.languages)} (representation.min_language_share="
            f"{hyg.min_language_share:.0%}); others: {others or 'none'}. Add the language to "
            "representation.languages if it belongs, or remove those records"
        )
        found = index_triples(info.get("partial_unexpected_index_list"))
        rows = offending_rows(found, df, rows_shown)
    count = info.get("unexpected_count")
    percent = info.get("unexpected_percent")
    return ExpectationOutcome(
        name=name,
        type=config.type,
        column=config.kwargs.get("column"),
        success=bool(result.success),
        problem=f"could not be checked: {error}" if error else problem,
        unexpected_count=None if count is None else int(count),
        unexpected_percent=None if percent is None else float(percent),
        observed_value=observed,
        rows=rows,
    )
