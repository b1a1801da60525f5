"""Secret masking judges what a value is, not a word inside its key: the gate's token accuracy
and token counts are recorded as numbers; tokens, keys and passwords in values are masked."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from retune.config import Params
from retune.masking import MASK, is_secret_key, mask_secrets, mask_value, safe_params
from tests.helpers import tiny_params_for

HF_TOKEN = "hf_" + "FakeTokenForTests" * 2
OPENAI_KEY = "sk-" + "proj" + "Q7wX2kLm9PzR4tYv8NbC3dFg"
STORE_URL = "postgresql://retune:s3cretpw@db.internal/feedback"


def with_secrets(tmp_path: Path) -> Params:
    """Tiny params with a gate setting named after tokens, and secrets in string settings that
    are not named like secrets."""
    return tiny_params_for(
        tmp_path,
        promote={"min_next_token_accuracy": 0.3},
        feedback={"store_url": STORE_URL},
        serve={"token_env": HF_TOKEN},  # an env var's name, here mistakenly the token itself
    )


def test_numeric_settings_named_after_tokens_are_recorded_as_values(tmp_path: Path) -> None:
    flat = safe_params(with_secrets(tmp_path))
    assert flat["promote.min_next_token_accuracy"] == "0.3"
    assert flat["serve.max_tokens"] == "256"
    assert flat["evaluate.max_new_tokens"] == "8"
    assert flat["train.max_steps"] == "6"
    assert flat["promote.max_unsafe_share"] == "0.05"
    assert not is_secret_key("promote.min_next_token_accuracy")
    assert not is_secret_key("serve.token_env") and not is_secret_key("train.max_tokens")
    # The default params.yaml holds no secret: nothing in it is masked.
    defaults = safe_params(Params())
    assert MASK not in "".join(defaults.values())
    assert defaults["serve.token_env"] == "RETUNE_SERVE_TOKEN"


def test_secret_values_are_masked_wherever_they_are(tmp_path: Path) -> None:
    flat = safe_params(with_secrets(tmp_path))
    assert flat["feedback.store_url"] == f"postgresql://retune:{MASK}@db.internal/feedback"
    assert flat["serve.token_env"] == MASK
    assert mask_value(f"--api {OPENAI_KEY} --rev 2") == f"--api {MASK} --rev 2"
    assert mask_value("Authorization: Bearer Xq7LmP2vR9sT4wZ8kN3b") == (
        f"Authorization: Bearer {MASK}"
    )
    # A key that ends with a secret's name hides its text whole, whatever it looks like; a
    # number under such a name is no secret.
    named = mask_secrets(
        {"hub.token": "letmein", "db.password": "hunter2", "hub.api_key": 12, "hub.auth": None}
    )
    assert named == {
        "hub.token": MASK,
        "db.password": MASK,
        "hub.api_key": "12",
        "hub.auth": "None",
    }


@pytest.mark.slow
def test_the_train_run_logs_gate_settings_as_values_and_masks_secrets_in_mlflow(
    tmp_path: Path, prepared: Params
) -> None:
    from mlflow import MlflowClient

    from retune.reports import read_json
    from tasks import split, train

    secrets = with_secrets(tmp_path)
    params = dataclasses.replace(
        prepared, promote=secrets.promote, feedback=secrets.feedback, serve=secrets.serve
    )
    split.run(params)
    train.run(params)
    run_id = read_json(params.paths.reports / "train.json")["run_id"]
    logged = MlflowClient().get_run(run_id).data.params
    assert logged["promote.min_next_token_accuracy"] == "0.3"
    assert logged["serve.max_tokens"] == "256"
    assert logged["train.max_steps"] == "6"
    assert logged["feedback.store_url"] == f"postgresql://retune:{MASK}@db.internal/feedback"
    assert logged["serve.token_env"] == MASK
    assert not any(
        secret in value for value in logged.values() for secret in ("s3cretpw", HF_TOKEN)
    )
