"""User settings kept in the store: Ollama host, model overrides. One dataclass, validated on save.

The CLI's flags and the Settings page both read defaults from here, and the overrides apply in one
place: `resolve_generator`, `resolve_scorer` and `backend_for`, which every command, job and page asks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import models
from core.backends import OPENAI_SERVERS, server_urls
from core.config import Config, option, specs
from core.errors import BadInput
from core.store import Store

if TYPE_CHECKING:
    from core.backends.base import Backend

DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"
# Databases SQLAlchemy (Optuna's RDB storage) can share one study through, across machines.
OPTUNA_STORAGE_SCHEMES = ("postgresql://", "postgresql+", "mysql://", "mysql+", "sqlite:///")


@dataclass(frozen=True)
class WorkbenchSettings(Config):
    what = "workbench setting"

    ollama_host: str = option(
        "",
        help=f"Ollama server URL; empty uses $OLLAMA_HOST or {DEFAULT_OLLAMA_HOST}. Several, comma-separated, share"
        " the requests (each with its own parallel slots; one that goes away leaves its share to the others).",
    )
    ollama_parallel: int = option(
        1, help="Requests sent to Ollama at once; match the server's OLLAMA_NUM_PARALLEL.", min=1, max=64
    )
    openai_base_url: str = option(
        "",
        help="URL of an OpenAI-compatible server for the openai backend (vLLM, llama-server, TGI, LM Studio), e.g."
        " http://gpu-box:8000/v1; several, comma-separated, share the requests. Its API key, if it needs one, is read"
        " from $OPENAI_API_KEY and never stored.",
    )
    openai_server: str = option(
        "vllm",
        help="What serves that URL, which decides how top_k and the repeat penalty are sent: vllm, llama-server,"
        " lmstudio, tgi or openai (which take no top_k; openai no repeat penalty either).",
        choices=OPENAI_SERVERS,
    )
    openai_parallel: int = option(
        4, help="Requests sent to the OpenAI-compatible server at once (its parallel slots).", min=1, max=256
    )
    llamacpp_parallel: int = option(
        16,  # the sweep benchmark's fastest on 2 cores: 8 sequences 77 tokens/s, 16: 90, 32: 87
        help="Sequences the embedded llama.cpp engine decodes at once in sweeps and evaluations (1: one at a"
        " time, the answers llama-cpp-python gives); batched answers can differ slightly near ties.",
        min=1,
        max=64,
    )
    generator_model: str = option(
        "",
        help="Generator replacing the embedded Gemma 3 270M: a local checkpoint folder or hub id (transformers,"
        " training).",
    )
    generator_gguf: str = option("", help="GGUF file replacing the embedded one for llama.cpp.")
    scorer_model: str = option(
        "", help="BERTScore model replacing all-MiniLM-L6-v2: a local folder or hub id such as bert-base-uncased."
    )
    optuna_storage: str = option(
        "",
        help="Optuna storage URL for hyperparameter searches whose workers run on several machines, "
        "e.g. postgresql://user:password@host/db; empty keeps each study in the workbench's own SQLite file.",
    )

    def _check(self) -> None:
        for host in server_urls(self.ollama_host):
            if not host.startswith(("http://", "https://")) and ":" not in host:
                raise BadInput(f"Ollama host {host!r} should look like http://127.0.0.1:11434")
        for url in server_urls(self.openai_base_url):
            if not url.startswith(("http://", "https://")):
                raise BadInput(f"the OpenAI-compatible server URL {url!r} should look like http://127.0.0.1:8000/v1")
        storage = self.optuna_storage.strip()
        if storage and not storage.startswith(OPTUNA_STORAGE_SCHEMES):
            raise BadInput(f"Optuna storage should be a URL such as postgresql://user@host/db, got {storage!r}")

    @property
    def effective_ollama_host(self) -> str:
        return self.ollama_host or os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_HOST


def load(store: Store) -> WorkbenchSettings:
    saved = store.get_setting("workbench_settings", {}) or {}
    # A setting an older version saved and this one no longer has is dropped, not refused: the user cannot
    # remove it from the store, and Settings would otherwise never open again.
    known = {s.name for s in specs(WorkbenchSettings)}
    return WorkbenchSettings.from_dict({k: v for k, v in saved.items() if k in known})


def validate(values: WorkbenchSettings) -> WorkbenchSettings:
    """The settings with their texts stripped, once the files and folders they name are found (construction
    has checked the rest)."""
    gguf = values.generator_gguf.strip()
    if gguf and not Path(gguf).expanduser().is_file():
        raise BadInput(f"no GGUF file at {gguf}")
    for name in ("generator_model", "scorer_model"):
        value = getattr(values, name).strip()
        if value.startswith(("/", "~", ".")) and not Path(value).expanduser().exists():
            raise BadInput(f"no model folder at {value}")
    return WorkbenchSettings.from_dict({k: v.strip() if isinstance(v, str) else v for k, v in values.to_dict().items()})


def save(store: Store, values: WorkbenchSettings) -> WorkbenchSettings:
    checked = validate(values)
    store.set_setting("workbench_settings", checked.to_dict())
    return checked


def pinned_generator(store: Store, backend: str, model: str = "") -> str:
    """The generator to record in a job that runs (or resumes) later: `model` when one is named, else the Settings
    override for `backend`, else "" (the embedded model). Recorded so, a later change of Settings never moves a
    training, a search or a sweep onto another model halfway."""
    if model:
        return model
    chosen = load(store)
    return {"llamacpp": chosen.generator_gguf, "transformers": chosen.generator_model}.get(backend, "")


def resolve_generator(store: Store, backend: str, model: str = "", progress: models.Progress = models.report) -> str:
    """The model `backend` really runs, in full (a path for the embedded engines): `model` when one is named,
    else the Settings override for that engine (a GGUF for llama.cpp, a checkpoint for transformers and
    training), else the embedded model, prepared now if it is missing. Runs, sweeps, training, QA generation
    and the Playground all ask here, so an override reaches every one of them.
    """
    if backend in ("llamacpp", "transformers"):
        return models.resolve_generator(pinned_generator(store, backend, model), backend, progress)
    if backend == "ollama" and not model:
        raise BadInput("the ollama backend needs a model name (e.g. llama2:7b)")
    if backend == "openai" and not model:
        raise BadInput("the openai backend needs the name of a model its server serves (see its /v1/models)")
    return model or backend


def resolve_scorer(store: Store, model: str = "") -> str:
    """The BERTScore model for a ScorerConfig: `model` when one is named, else the Settings override, else ""
    (the embedded MiniLM; its stamp names it so). Refuses an embedded scorer whose package is missing."""
    chosen = model or load(store).scorer_model
    models.resolve_scorer(chosen)
    return chosen


def backend_options(store: Store, backend: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`options` completed from Settings (the Ollama or OpenAI-compatible server and how many requests it takes at
    once)."""
    options = dict(options or {})
    if backend == "ollama":
        chosen = load(store)
        options.setdefault("host", chosen.effective_ollama_host)
        options.setdefault("parallel", chosen.ollama_parallel)
    if backend == "openai":
        chosen = load(store)
        if not (options.get("base_url") or chosen.openai_base_url):
            raise BadInput("set the OpenAI-compatible server's URL in Settings first (e.g. http://127.0.0.1:8000/v1)")
        options.setdefault("base_url", chosen.openai_base_url)
        options.setdefault("server", chosen.openai_server)
        options.setdefault("parallel", chosen.openai_parallel)
    return options


def backend_for(store: Store, backend: str, model: str = "", **options: Any) -> Backend:
    """A backend configured from Settings: its model as `resolve_generator` finds it, its options as
    `backend_options` completes them (several server URLs: a pool, see make_backend)."""
    from core.backends import make_backend  # the engines' imports are heavy; most users of Settings need none

    return make_backend(backend, resolve_generator(store, backend, model), **backend_options(store, backend, options))
