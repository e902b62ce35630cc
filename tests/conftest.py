"""Shared fixtures: each test gets its own WORKBENCH_HOME; the embedded models are shared.

The embedded models live in the repo's workspace (prepared by `make test`); tests point
WORKBENCH_MODELS there so that no test re-converts them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WORKBENCH_MODELS", str(ROOT / "workspace" / "models"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(autouse=True)
def workbench_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "workspace"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    return home


@pytest.fixture
def store(workbench_home):
    from core.store import Store

    s = Store()
    yield s
    s.close()


@pytest.fixture
def starter(store):
    """A store with the starter dataset imported and split, as on a first run."""
    from core import dataset

    dataset.ensure_starter(store)
    dataset.make_split(store, "starter")
    return store


@pytest.fixture(scope="session")
def embedded_models():
    """The embedded Gemma 3 270M (GGUF and HF checkpoint); prepared once if `make` did not."""
    from core import models

    models.prepare_all(progress=lambda msg: None)
    return models


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, embedded_models) -> Path:
    """A randomly initialised 2-layer Llama with the embedded model's tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(embedded_models.hf_checkpoint_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m workbench ARGS` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=timeout,
    )
