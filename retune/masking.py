"""Params as flat `dotted.key -> str` pairs with secrets masked, safe for MLflow and model cards.

Any stage that records settings (run params, registry tags, reports) passes them through
`safe_params`: a token or password in params.yaml or an override must never be stored.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MASK = "***"

# Whole words of a key (split on `.`, `_`, `-` and camelCase) that mark its value as secret.
_SECRET_WORDS = {
    "token",
    "password",
    "passwd",
    "pwd",
    "secret",
    "apikey",
    "credential",
    "credentials",
    "auth",
}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")}

# `scheme://user:password@host`; `:/` too, since a Path collapses `//` to `/`.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*:/{1,2}[^/\s:@]*:)[^@\s/]+(?=@)")
# `?token=...` / `&api_key=...` in URLs.
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:[A-Za-z0-9_-]*(?:token|key|secret|password|passwd|sig|signature)"
    r"[A-Za-z0-9_-]*)=)[^&;#\s]+",
    re.IGNORECASE,
)
# Well-known credential shapes that give themselves away wherever they appear.
_TOKEN_SHAPES = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16}|xox[abposr]-[A-Za-z0-9-]{10,})"
)


def is_secret_key(key: str) -> bool:
    """True if a (dotted) key names a secret: `hf_token`, `db.password`, `apiKey`, `api-key`."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()
    words = [w for w in re.split(r"[._\-\s]+", spaced) if w]
    return bool(_SECRET_WORDS.intersection(words)) or any(
        pair in _SECRET_PAIRS for pair in itertools.pairwise(words)
    )


def mask_value(value: str) -> str:
    """Mask passwords in URLs, secret query parameters and recognisable tokens inside `value`."""
    value = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, value)
    value = _QUERY_SECRET.sub(lambda m: m.group("head") + MASK, value)
    return _TOKEN_SHAPES.sub(MASK, value)


def mask_secrets(flat: Mapping[str, str]) -> dict[str, str]:
    """Return `flat` with secret-named keys' values replaced by `***` and the rest scrubbed."""
    return {k: MASK if is_secret_key(k) and v else mask_value(v) for k, v in flat.items()}


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dataclasses/mappings as `{"train.max_steps": "400", ...}`; lists become JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, child in value.items():
            out.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, (list, tuple)):
        text = json.dumps([str(v) if isinstance(v, Path) else v for v in value])
    elif isinstance(value, bool):
        text = str(value).lower()
    else:
        text = str(value)
    return {prefix: text}


def safe_params(params: Any) -> dict[str, str]:
    """`params` (a `Params` or any nested dataclass/mapping) flattened, secrets masked."""
    return mask_secrets(flatten(params))
