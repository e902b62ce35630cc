"""User settings kept in the store: Ollama host, model overrides. One dataclass, validated on save.

The CLI's flags and the Settings page both read defaults from here.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from core.errors import BadInput
from core.store import Store

DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"
# Databases SQLAlchemy (Optuna's RDB storage) can share one study through, across machines.
OPTUNA_STORAGE_SCHEMES = ("postgresql://", "postgresql+", "mysql://", "mysql+", "sqlite:///")


@dataclass(frozen=True)
class WorkbenchSettings:
    ollama_host: str = field(
        default="", metadata={"help": f"Ollama server URL; empty uses $OLLAMA_HOST or {DEFAULT_OLLAMA_HOST}."}
    )
    ollama_parallel: int = field(
        default=1, metadata={"help": "Requests sent to Ollama at once; match the server's OLLAMA_NUM_PARALLEL."}
    )
    generator_model: str = field(
        default="",
        metadata={
            "help": "Generator replacing the embedded Gemma 3 270M: a "
            "local checkpoint folder or hub id (transformers, training)."
        },
    )
    generator_gguf: str = field(default="", metadata={"help": "GGUF file replacing the embedded one for llama.cpp."})
    scorer_model: str = field(
        default="",
        metadata={
            "help": "BERTScore model replacing all-MiniLM-L6-v2: a local folder or hub id such as bert-base-uncased."
        },
    )
    optuna_storage: str = field(
        default="",
        metadata={
            "help": "Optuna storage URL for hyperparameter searches whose workers run on several machines, "
            "e.g. postgresql://user:password@host/db; empty keeps each study in the workbench's own SQLite file."
        },
    )

    @property
    def effective_ollama_host(self) -> str:
        return self.ollama_host or os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_HOST


def load(store: Store) -> WorkbenchSettings:
    saved = store.get_setting("workbench_settings", {}) or {}
    known = {f.name for f in fields(WorkbenchSettings)}
    return WorkbenchSettings(**{k: v for k, v in saved.items() if k in known})


def validate(values: WorkbenchSettings) -> WorkbenchSettings:
    host = values.ollama_host.strip()
    if host and not host.startswith(("http://", "https://")) and ":" not in host:
        raise BadInput(f"Ollama host {host!r} should look like http://127.0.0.1:11434")
    if not 1 <= values.ollama_parallel <= 64:
        raise BadInput("parallel Ollama requests must be between 1 and 64")
    gguf = values.generator_gguf.strip()
    if gguf and not Path(gguf).expanduser().is_file():
        raise BadInput(f"no GGUF file at {gguf}")
    storage = values.optuna_storage.strip()
    if storage and not storage.startswith(OPTUNA_STORAGE_SCHEMES):
        raise BadInput(f"Optuna storage should be a URL such as postgresql://user@host/db, got {storage!r}")
    for name in ("generator_model", "scorer_model"):
        value = getattr(values, name).strip()
        if value.startswith(("/", "~", ".")) and not Path(value).expanduser().exists():
            raise BadInput(f"no model folder at {value}")
    return WorkbenchSettings(**{k: v.strip() if isinstance(v, str) else v for k, v in asdict(values).items()})


def save(store: Store, values: WorkbenchSettings) -> WorkbenchSettings:
    checked = validate(values)
    store.set_setting("workbench_settings", asdict(checked))
    return checked


def default_generator(store: Store, backend: str) -> str:
    """The generator a run uses when none is named: the Settings override, else the embedded model."""
    chosen = load(store)
    return {"llamacpp": chosen.generator_gguf, "transformers": chosen.generator_model}.get(backend, "")
