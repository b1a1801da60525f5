"""params.yaml parsing: defaults, strictness, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from retune.config import ConfigError, Params, apply_overrides, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_spells_out_the_defaults() -> None:
    # params.yaml is the documented config: it must show exactly what the code uses.
    assert load_params(ROOT / "params.yaml") == Params()


def test_unknown_key_fails_naming_the_dotted_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.max_stepz: unknown key"):
        parse_params({"train": {"max_stepz": 3}})
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        parse_params({"trian": {}})


def test_bad_value_fails_naming_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"train\.learning_rate.*got -1"):
        parse_params({"train": {"learning_rate": -1}})
    with pytest.raises(ConfigError, match=r"split\.holdout_fraction"):
        parse_params({"split": {"holdout_fraction": 1.5}})
    with pytest.raises(ConfigError, match=r"ingest\.redact"):
        parse_params({"ingest": {"redact": ["email", "horoscope"]}})


def test_sections_are_frozen() -> None:
    params = Params()
    with pytest.raises(Exception, match="cannot assign"):
        params.train.max_steps = 1  # type: ignore[misc]


def test_dotted_overrides_parse_values_as_yaml() -> None:
    raw = apply_overrides({"train": {"max_steps": 400}}, ["train.max_steps=10", "seed=7"])
    assert raw == {"train": {"max_steps": 10}, "seed": 7}
    params = load_params(ROOT / "params.yaml", ["train.scratch.n_layer=2", "train.base_model=./m"])
    assert params.train.scratch.n_layer == 2
    assert params.train.base_model == "./m"


def test_malformed_override_and_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        apply_overrides({}, ["train.max_steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_a_moved_key_fails_naming_where_it_went(tmp_path: Path) -> None:
    old = tmp_path / "params.yaml"
    old.write_text(
        "hygiene:\n  near_duplicate_threshold: 0.85\n  languages: [en, de]\n"
        "evaluate:\n  folds: 3\n  batch_size: 4\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_params(old)
    message = str(caught.value)
    assert str(old) in message
    for line in (
        "hygiene.near_duplicate_threshold: moved to near_duplicates.threshold",
        "hygiene.languages: moved to representation.languages",
        "evaluate.folds: moved to cv.folds",
        "evaluate.batch_size: moved to scoring.batch_size",
    ):
        assert line in message
    # An override in the old spelling is named the same way.
    with pytest.raises(ConfigError, match=r"evaluate\.max_examples: moved to scoring"):
        load_params(ROOT / "params.yaml", ["evaluate.max_examples=10"])
    # Renamed, the same values load.
    old.write_text(
        "near_duplicates:\n  threshold: 0.85\nrepresentation:\n  languages: [en, de]\n"
        "cv:\n  folds: 3\nscoring:\n  batch_size: 4\n"
    )
    params = load_params(old)
    assert params.near_duplicates.threshold == 0.85 and params.cv.folds == 3
    assert params.representation.languages == ("en", "de") and params.scoring.batch_size == 4
