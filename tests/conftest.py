"""Shared fixtures: each test gets its own WORKBENCH_HOME; the embedded models are shared.

The embedded models live in the repo's workspace (prepared by `make test`); tests point
WORKBENCH_MODELS there so that no test re-converts them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WORKBENCH_MODELS", str(ROOT / "workspace" / "models"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "empty_workspace: start from a workspace with no store at all")


@pytest.fixture(scope="session")
def seeded_store_file(tmp_path_factory) -> Path:
    """A store with the starter dataset imported and flagged, built once and copied into each test.

    First use of a workspace embeds the starter questions (seconds); copying spares every test that.
    """
    from core import intake
    from core.store import Store

    path = tmp_path_factory.mktemp("seed") / "workbench.sqlite"
    with Store(path) as store:
        intake.ensure_starter(store)
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


@pytest.fixture(autouse=True)
def workbench_home(request, tmp_path, monkeypatch) -> Path:
    """Each test's own WORKBENCH_HOME: a seeded copy of the starter workspace, or empty when marked so."""
    home = tmp_path / "workspace"
    home.mkdir()
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    if not request.node.get_closest_marker("empty_workspace"):
        shutil.copy(request.getfixturevalue("seeded_store_file"), home / "workbench.sqlite")
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
    from core import intake

    intake.ensure_starter(store)
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
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def tiny_training(path: Path, **overrides) -> dict:
    """TrainConfig settings that train a tiny random model in seconds: LoRA on all linear layers, no evaluation."""
    from core.train_config import ALL_LINEAR

    settings = {
        "dataset": "starter",
        "method": "lora",
        "model": str(path),
        "target_modules": ALL_LINEAR,
        "learning_rate": 1e-2,
        "batch_size": 2,
        "max_seq_len": 64,
        "evaluate_with": "none",  # llama.cpp evaluation needs a GGUF of the base, which only the embedded model has
    }
    return {**settings, **overrides}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 60.0):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m workbench ARGS` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """The real app (`streamlit run workbench/app.py`) on a free 127.0.0.1 port with its own workspace."""
    import time
    import urllib.request

    home = tmp_path_factory.mktemp("app-workspace")
    port = free_port()
    log = open(home / "streamlit.log", "wb")  # noqa: SIM115 - closed when the fixture ends
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "workbench/app.py",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--server.headless",
            "true",
        ],
        cwd=ROOT,
        env={**os.environ, "WORKBENCH_HOME": str(home)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError((home / "streamlit.log").read_text()[-2000:]) from None
            time.sleep(0.3)
    yield type("AppServer", (), {"url": url, "home": home, "process": proc})
    os.killpg(proc.pid, 15)
    proc.wait(timeout=15)
    log.close()


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium driven by Playwright (its own browser download does not work here)."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.fail("Debian's chromium is missing: `make test` installs it (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(chromium),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
            ],
        )
        yield b
        b.close()


def wait_for_streamlit(page, timeout: float = 60.0) -> None:
    """Wait until the app has drawn and no script run is in progress."""
    import time

    page.wait_for_selector("[data-testid='stApp']", timeout=timeout * 1000)
    deadline = time.monotonic() + timeout
    time.sleep(0.5)
    while time.monotonic() < deadline:
        if not page.query_selector("[data-testid='stStatusWidget']"):
            time.sleep(0.3)
            if not page.query_selector("[data-testid='stStatusWidget']"):
                return
        time.sleep(0.2)
    raise AssertionError("the app kept running its script")
