"""Learning from ratings: the preference set accounts for every rated exchange and holds no
personal data, its contract stops what it must, KTO and DPO tune a tiny model with the supervised
model as the frozen reference, and the stage hands the supervised model on, saying why, when
there is too little to learn from."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from retune.config import Params
from retune.data.preference import PreferenceSet, build, is_holdout
from retune.data.records import record_id
from retune.errors import DataValidationError
from tests.helpers import make_conversations, tiny_params_for


def log(store: Any, prompt: str, reply: str, version: str = "1", **feedback: Any) -> str:
    rid: str = store.log_interaction(
        model_name="retune-test",
        model_version=version,
        kind="chat",
        messages=[{"role": "user", "content": prompt}],
        reply=reply,
        latency_ms=10.0,
        prompt_tokens=8,
        completion_tokens=6,
    )
    for one in feedback.get("ratings", [feedback]):
        store.add_feedback(interaction_id=rid, **one)
    return rid


@pytest.fixture
def params(tmp_path: Path) -> Params:
    return tiny_params_for(tmp_path)


@pytest.fixture
def store(params: Params) -> Any:
    from retune.online.feedback import FeedbackStore

    store = FeedbackStore.open(params.feedback.store_url)
    yield store
    store.close()


def rated(store: Any) -> dict[str, str]:
    """One interaction of each kind the export must tell apart, by name."""
    return {
        "up": log(store, "Where is my parcel?", "It ships today.", rating="up"),
        "down": log(store, "Can I get a refund?", "No.", rating="down"),
        "score_high": log(store, "Reset my router?", "Hold reset for 10 s.", score=0.8),
        "score_low": log(store, "Camera offline?", "Dunno.", score=0.2),
        # A person's change of mind: the latest rating counts.
        "changed": log(
            store,
            "Is the warranty 2 years?",
            "Yes, two years.",
            ratings=[{"rating": "down"}, {"rating": "up"}],
        ),
        "corrected": log(
            store,
            "How do I pair the remote?",
            "Try again.",
            rating="down",
            corrected_reply="Hold the home button for 5 s until the light blinks.",
        ),
        "pii": log(store, "Mail me at jane.doe@example.com", "Will do.", rating="up"),
        "too_long": log(store, "Explain everything. " * 80, "Sure.", rating="up"),
        "empty_reply": log(store, "Hello?", "", rating="down"),
        "older_copy": log(store, "Where is my parcel?", "It ships today.", rating="down"),
        "old_version": log(store, "Old question?", "Old answer.", version="0", rating="up"),
    }


def test_every_rated_exchange_is_used_or_skipped_with_a_reason(params: Params, store: Any) -> None:
    ids = rated(store)
    feedback = store.feedback_frame(model_name="retune-test")

    pset = build(feedback, params.preference_data, ("email", "phone"), 4000)

    outcome = {e["interaction_id"]: e["outcome"] for e in pset.exchanges}
    assert len(pset.exchanges) == len(ids) == len(set(outcome))  # each once, none lost
    assert outcome[ids["too_long"]] == "too_long"
    assert outcome[ids["empty_reply"]] == "invalid"
    # The same prompt and reply rated twice: the newer rating (down) is kept.
    assert outcome[ids["up"]] == "duplicate"
    assert outcome[ids["older_copy"]] in ("train", "holdout")
    assert outcome[ids["old_version"]] in ("train", "holdout")  # versions: all keeps it
    used = {i for i, o in outcome.items() if o in ("train", "holdout")}
    assert used == set(ids.values()) - {ids["too_long"], ids["empty_reply"], ids["up"]}
    counts = pset.counts()
    assert sum(counts["outcomes"].values()) == len(ids)

    label = {r["interaction_id"]: r["label"] for r in pset.kto if r["origin"] == "served"}
    assert label[ids["older_copy"]] is False
    assert label[ids["score_high"]] is True and label[ids["score_low"]] is False
    assert label[ids["changed"]] is True
    # A correction: the corrected reply desirable, the served one not, and the two a DPO pair.
    corrected = [r for r in pset.kto if r["interaction_id"] == ids["corrected"]]
    assert {(r["origin"], r["label"]) for r in corrected} == {
        ("corrected", True),
        ("served", False),
    }
    (pair,) = pset.dpo
    assert pair["chosen"].startswith("Hold the home button") and pair["rejected"] == "Try again."
    # Redacted as ingest redacts; a prompt's examples all go to one split, by its hash.
    texts = [m["content"] for r in pset.kto for m in r["prompt"]]
    assert "Mail me at [EMAIL]" in texts and not any("jane.doe" in t for t in texts)
    for r in pset.kto:
        prompt = [(m["role"], m["content"]) for m in r["prompt"]]
        assert r["split"] == ("holdout" if is_holdout(record_id(prompt), 0.2) else "train")

    newest = dataclasses.replace(params.preference_data, versions="newest")
    skipped = build(feedback, newest, ("email",), 4000)
    assert {e["interaction_id"]: e["outcome"] for e in skipped.exchanges}[
        ids["old_version"]
    ] == "other_version"


def test_the_stage_writes_a_versioned_set_and_says_when_it_is_too_small(
    params: Params, store: Any
) -> None:
    from tasks.preference_data import run

    rated(store)
    result = run(params)

    folder = params.paths.preference
    kto = pq.read_table(folder / "kto.parquet").to_pylist()
    exchanges = pq.read_table(folder / "exchanges.parquet").to_pylist()
    assert len(exchanges) == 11 and len(kto) == result.counts["exchanges"] - 3 + 1
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["data_version"] == result.data_version
    report = json.loads((params.paths.reports / "preference_data.json").read_text())
    assert report["outcomes"]["too_long"] == 1 and "too_long" in report["skip_reasons"]
    # Two pairs are needed (preference_data.min_per_label) and one correction exists.
    assert result.ready["dpo"] is False and manifest["ready"]["dpo"] is False
    min_pairs = next(c for c in report["contract"]["dpo"] if c["name"] == "min_pairs")
    pairs = result.counts["dpo"]["train"]
    assert pairs <= 1 and sum(result.counts["dpo"].values()) == 1
    assert f"{pairs} pairs to tune on, preference_data.min_per_label is 2" in min_pairs["problem"]

    again = run(params)  # the same ratings: the same data version
    assert again.data_version == result.data_version


def test_personal_data_in_the_set_breaks_its_contract(params: Params) -> None:
    from tasks.preference_data import check, raise_if_unsafe

    prompt = [{"role": "user", "content": "Call me on +1 415-555-0132"}]
    row = {"interaction_id": "x", "model_version": "1", "prompt": prompt, "split": "train"}
    pset = PreferenceSet(
        kto=[
            row | {"id": str(i), "feedback_id": i, "completion": "OK", "label": i % 2 == 0}
            for i in range(4)
        ]
    )
    outcomes = check(pset, params.preference_data, ("phone",), 3)

    failed = {o.name: o for o in outcomes["kto"] if not o.success}
    assert set(failed) == {"no_phone"}
    assert failed["no_phone"].unexpected_count == 4
    assert [r.where() for r in failed["no_phone"].rows] == [f"feedback:{i}" for i in range(3)]
    assert "415-555" not in " ".join(r.snippet for r in failed["no_phone"].rows)
    with pytest.raises(DataValidationError, match="nothing was written") as caught:
        raise_if_unsafe(outcomes)
    assert "kto no_phone: 4 still contain" in str(caught.value)
    assert "feedback:0: Call me on [PHONE]" in str(caught.value)


def write_set(folder: Path, n: int) -> None:
    """`n` KTO examples (a third undesirable) and n // 2 DPO pairs, all in the train split."""
    from tasks.preference_data import write

    pset = PreferenceSet()
    for i, conv in enumerate(make_conversations(n)):
        prompt = [{"role": "user", "content": conv[0][1][:60]}]
        base = {"interaction_id": str(i), "feedback_id": i, "model_version": "1", "split": "train"}
        base |= {"prompt": prompt}
        pset.kto.append(
            base
            | {
                "id": f"k{i}",
                "completion": conv[1][1][:60],
                "label": i % 3 != 0,
                "origin": "served",
            }
        )
        if i < n // 2:
            pset.dpo.append(base | {"id": f"d{i}", "chosen": conv[1][1][:60], "rejected": "No."})
    write(pset, folder, {"ready": {"kto": True, "dpo": True}})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


class KeepsReference:
    """Records the reference model the stage loads (the second `load_pretrained` call)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import retune.model.preference as preference

        self.loaded: list[Any] = []
        real = preference.load_pretrained

        def load(path: Any) -> Any:
            pair = real(path)
            self.loaded.append(pair[0])
            return pair

        monkeypatch.setattr(preference, "load_pretrained", load)


@pytest.mark.parametrize("method", ["kto", "dpo"])
def test_a_full_tune_moves_the_weights_and_keeps_the_reference_frozen(
    method: str, params: Params, tiny_model_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    from retune.model.preference import tune

    write_set(tmp_path / "pref", 24)
    spy = KeepsReference(monkeypatch)
    cfg = dataclasses.replace(params.preference, method=method)

    result = tune(
        cfg, params.train, 0, tiny_model_dir, tmp_path / "pref", tmp_path / "out", tmp_path / "w"
    )

    assert result.steps == 3 and result.method == method
    before, after = weights(tiny_model_dir), weights(tmp_path / "out")
    assert any(not after[k].equal(before[k]) for k in before)  # the policy moved
    _, reference = spy.loaded
    assert not any(p.requires_grad for p in reference.parameters())
    for name, value in reference.state_dict().items():
        if name in before:
            assert value.equal(before[name]), name  # the reference is the sft model, untouched
    figures = result.final
    assert "loss" in figures and "rewards/chosen" in figures
    if method == "kto":
        assert "kl" in figures
        assert result.weights == (1.0, 2.0)  # 16 desirable, 8 undesirable: balanced


def test_a_lora_tune_trains_only_a_new_adapter(tmp_path: Path, monkeypatch: Any) -> None:
    from retune.model.preference import tune
    from tests.bases import save_tiny_base

    base = save_tiny_base("smollm2", tmp_path / "base")
    params = tiny_params_for(
        tmp_path, train={"adapter": "lora", "max_seq_len": 128, "base_model": str(base)}
    )
    write_set(tmp_path / "pref", 24)
    spy = KeepsReference(monkeypatch)
    cfg = dataclasses.replace(params.preference, method="kto", learning_rate=1e-2)

    result = tune(cfg, params.train, 0, base, tmp_path / "pref", tmp_path / "out", tmp_path / "w")

    assert len(spy.loaded) == 1  # no second copy: the adapter switched off is the reference
    assert result.trainable.adapter == "lora" and result.trainable.share < 0.5
    before, after = weights(base), weights(tmp_path / "out")
    changed = {k for k in before if not after[k][: before[k].shape[0]].equal(before[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_the_stage_hands_the_sft_model_on_below_min_examples(
    params: Params, tiny_model_dir: Path, capsys: Any
) -> None:
    import shutil

    import mlflow

    from retune.release.tracking import setup_tracking
    from tasks.preference import run

    shutil.copytree(tiny_model_dir, params.paths.sft)
    write_set(params.paths.preference, 3)  # preference.min_examples is 4
    setup_tracking(params.tracking)
    with mlflow.start_run() as active:
        pass
    params.paths.reports.mkdir(parents=True)
    (params.paths.reports / "train.json").write_text(json.dumps({"run_id": active.info.run_id}))
    tuned = tiny_params_for(params.paths.reports.parent, preference={"method": "kto"})

    result = run(tuned)

    assert not result.tuned
    assert "3 kto examples to tune on, preference.min_examples is 4" in result.reason
    assert "preference: not tuned (3 kto examples" in capsys.readouterr().out
    for file in params.paths.sft.iterdir():  # the sft model itself, file for file
        assert (params.paths.model / file.name).read_bytes() == file.read_bytes()
    report = json.loads((params.paths.reports / "preference.json").read_text())
    assert report == {"tuned": False, "method": "kto", "reason": result.reason}
    run_tags = mlflow.get_run(active.info.run_id).data.tags
    assert run_tags["preference"].startswith("not tuned: 3 kto examples")
