"""What the training data is made of: categories (a field of the records' `meta`), languages
(py3langid, whose model ships in the wheel), lengths and turns; and a chart of it.

`hygiene` reports it for the clean records; `validate` turns it into expectations
(no category under a minimum share, enough text in the expected languages).
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from py3langid.langid import LanguageIdentifier

# Characters of a text the language detector reads: enough for a confident guess, and the cost
# stays flat however long the conversations are.
_DETECT_CHARS = 1_000
UNKNOWN = "(none)"


def category_values(meta: pa.Array | pa.ChunkedArray, field: str) -> pa.Array:
    """The `field` value of each record's meta JSON as a string (null where it has none).

    A regular expression over the JSON text, not a parse per row: fast at a million records.
    Strings, numbers and booleans count; a nested object or list under `field` does not."""
    if isinstance(meta, pa.ChunkedArray):
        meta = meta.combine_chunks()
    key = re.escape(json.dumps(field, ensure_ascii=False))
    pattern = key + r'\s*:\s*(?P<v>"(?:[^"\\]|\\.)*"|-?[0-9][0-9.eE+-]*|true|false)'
    found = pc.extract_regex(meta, pattern)
    raw = pc.if_else(found.is_valid(), found.field("v"), pa.scalar(None, pa.string()))
    encoded = pc.dictionary_encode(raw)
    decoded = []
    for value in encoded.dictionary.to_pylist():
        try:
            decoded.append(str(json.loads(value)))
        except ValueError:
            decoded.append(value)
    return pc.take(pa.array(decoded, type=pa.string()), encoded.indices)


def sample_indices(ids: pa.Array | pa.ChunkedArray, n: int) -> np.ndarray:
    """Rows of the `n` smallest record ids (content hashes, so a uniform sample that depends
    on nothing but the content), in row order."""
    if n >= len(ids):
        return np.arange(len(ids))
    return np.sort(pc.bottom_k_unstable(ids, n).to_numpy().astype(np.int64))


@functools.cache
def _identifier() -> LanguageIdentifier:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=False)


def detect_languages(texts: list[str]) -> list[str]:
    """ISO 639-1 code of each text's language (py3langid, offline)."""
    ident = _identifier()
    return [str(ident.classify(t[:_DETECT_CHARS])[0]) if t.strip() else UNKNOWN for t in texts]


def _shares(counts: Counter[str], total: int) -> dict[str, float]:
    return {k: round(v / total, 6) if total else 0.0 for k, v in counts.most_common()}


def _summary(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    q = np.percentile(values, [50, 90, 99])
    return {
        "min": float(values.min()),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
        "max": float(values.max()),
        "mean": round(float(values.mean()), 2),
    }


def describe(
    ids: pa.Array | pa.ChunkedArray,
    chars: np.ndarray,
    turns: np.ndarray,
    categories: pa.Array | pa.ChunkedArray,
    texts_of: Callable[[np.ndarray], list[str]],
    category_field: str,
    language_sample: int,
) -> dict[str, Any]:
    """The representation report of n records: their ids, characters, messages, categories
    (see `category_values`), and `texts_of(rows)` giving the texts of the language sample."""
    n = len(ids)
    cat_counts: Counter[str] = Counter(
        {str(k): int(v) for k, v in _value_counts(categories).items() if k is not None}
    )
    with_cat = sum(cat_counts.values())
    rows = sample_indices(ids, language_sample)
    langs = Counter(detect_languages(texts_of(rows)))
    return {
        "records": n,
        "categories": {
            "field": category_field,
            "records_with": with_cat,
            "share_with": round(with_cat / n, 6) if n else 0.0,
            "counts": dict(cat_counts.most_common()),
            "shares": _shares(cat_counts, with_cat),
        },
        "languages": {
            "sampled": len(rows),
            "counts": dict(langs.most_common()),
            "shares": _shares(langs, len(rows)),
        },
        "chars": _summary(np.asarray(chars)),
        "turns": {str(k): int(v) for k, v in sorted(Counter(np.asarray(turns).tolist()).items())},
    }


def _value_counts(values: pa.Array | pa.ChunkedArray) -> dict[Any, int]:
    counts = pc.value_counts(values)
    return dict(
        zip(
            counts.field("values").to_pylist(),
            counts.field("counts").to_pylist(),
            strict=True,
        )
    )


def chart(report: dict[str, Any], chars: np.ndarray, path: Path) -> Path:
    """A PNG of the report: categories, languages, turns and the length histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    cats = report["categories"]
    _bars(axes[0][0], cats["shares"], f"categories (meta.{cats['field']}, share)")
    langs = report["languages"]
    _bars(axes[0][1], langs["shares"], f"languages ({langs['sampled']} sampled, share)", top=8)
    turns = report["turns"]
    axes[1][0].bar(list(turns), list(turns.values()), color="#4c72b0")
    axes[1][0].set_title("messages per record")
    if len(chars):
        axes[1][1].hist(np.log10(np.maximum(chars, 1)), bins=40, color="#4c72b0")
    axes[1][1].set_title("characters per record (log10)")
    fig.suptitle(f"retune: what the {report['records']:,} clean records are made of")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _bars(ax: Any, shares: dict[str, float], title: str, top: int = 20) -> None:
    items = list(shares.items())[:top]
    if not items:
        ax.text(0.5, 0.5, "none in the data", ha="center", va="center")
    else:
        ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#4c72b0")
    ax.set_title(title)
