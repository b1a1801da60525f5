"""Params as flat `dotted.key -> str` pairs with secrets masked, safe for MLflow and model cards.

Any stage that records settings (run params, registry tags, reports) passes them through
`safe_params`: a token or password in params.yaml or an override must never be stored.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MASK = "***"

# Names that mark a setting's value as secret when the key ends with them, as whole words
# (split on `.`, `_`, `-` and camelCase): `hf_token`, `db.password`, `apiKey`. Only the end
# counts: `promote.min_next_token_accuracy` is an accuracy and `serve.token_env` the name of
# an environment variable, though both contain "token".
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
_QUERY_SEPARATOR = re.compile(r"([&;])")


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()
    return [w for w in re.split(r"[._\-\s]+", spaced) if w]


def is_secret_key(key: str) -> bool:
    """True if a (dotted) key ends with a secret's name: `hf_token`, `db.password`, `apiKey`,
    `aws.secret_access_key`; not `promote.min_next_token_accuracy` or `serve.token_env`."""
    words = _words(key)
    return bool(words) and (words[-1] in _SECRET_WORDS or tuple(words[-2:]) in _SECRET_PAIRS)


def mask_value(value: str) -> str:
    """Mask what looks like a secret inside `value`, whatever its key: passwords in URLs,
    secret query parameters, and every secret `retune.data.pii` finds (known key formats such as
    `hf_...` and `sk-...`, bearer tokens, `password=...` assignments, long random tokens)."""
    from retune.data import pii

    value = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, value)
    value = _QUERY_SECRET.sub(lambda m: m.group("head") + MASK, value)
    # One query parameter at a time: the detector reads `token=***&rev=2` as one assignment.
    parts = _QUERY_SEPARATOR.split(value)
    for i, part in enumerate(parts):
        for match in reversed(pii.find(part, ("secret",))):
            part = part[: match.start] + MASK + part[match.end :]
        parts[i] = part
    return "".join(parts)


def _is_text(value: Any) -> bool:
    """A value that can hold a secret: not a number, a flag or unset."""
    return value is not None and not isinstance(value, bool | int | float)


def mask_secrets(flat: Mapping[str, Any]) -> dict[str, str]:
    """`flat` (dotted key -> setting) as strings, with the value of a key named like a secret
    (`is_secret_key`) replaced by `***` when it is text, and every value scrubbed
    (`mask_value`). A number is never masked whole: `train.max_tokens: 64` is no secret."""
    return {
        key: MASK
        if is_secret_key(key) and _is_text(value) and _text(value)
        else mask_value(_text(value))
        for key, value in flat.items()
    }


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dataclasses/mappings as `{"train.max_steps": 400, ...}`, each leaf as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, child in value.items():
            out.update(_leaves(child, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps([str(v) if isinstance(v, Path) else v for v in value])
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dataclasses/mappings as `{"train.max_steps": "400", ...}`; lists become JSON."""
    return {key: _text(leaf) for key, leaf in _leaves(value, prefix).items()}


def safe_params(params: Any) -> dict[str, str]:
    """`params` (a `Params` or any nested dataclass/mapping) flattened, secrets masked."""
    return mask_secrets(_leaves(params))
