"""Generation backends behind one protocol (core.backends.base.Backend), found by name.

Each backend module is imported only when asked for, so listing backends never loads
torch or llama.cpp.
"""

from __future__ import annotations

import importlib
from typing import Any

from core.backends.base import Backend
from core.errors import BadInput

BACKENDS: dict[str, str] = {
    "llamacpp": "core.backends.llamacpp:LlamaCppBackend",
    "transformers": "core.backends.hf:TransformersBackend",
    "ollama": "core.backends.ollama:OllamaBackend",
    "openai": "core.backends.openai_api:OpenAICompatibleBackend",
    "echo": "core.backends.echo:EchoBackend",
}
# Backends that run a native engine in the calling process (a long-lived process isolates them:
# core.engine_process).
NATIVE_BACKENDS = ("llamacpp", "transformers")
# What a person picks from; `echo` exists for tests and demos of the plumbing.
USER_BACKENDS = ("llamacpp", "transformers", "ollama", "openai")
# What may serve the openai backend's URL: it decides how top_k and the repeat penalty are named
# (core.backends.openai_api.SERVER_PARAMETERS).
OPENAI_SERVERS = ("vllm", "llama-server", "lmstudio", "tgi", "openai")
# Backends that answer from a server and need a model name: the server's.
SERVER_BACKENDS = ("ollama", "openai")


# The option naming a server backend's server; several URLs in it (comma-separated) make a pool.
URL_OPTIONS = {"ollama": "host", "openai": "base_url"}


def server_urls(text: str) -> list[str]:
    """The server URLs in a setting or an option: one, or several separated by commas or spaces."""
    return [url for url in text.replace(",", " ").split() if url]


def make_backend(name: str, model: str | None = None, **options: Any) -> Backend:
    """The backend `name` with these options; for a server backend given several URLs, a pool of one backend per
    server that spreads the requests over them (core.backends.pool)."""
    if name not in BACKENDS:
        raise BadInput(f"unknown backend {name!r}; choose one of {', '.join(USER_BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    backend_cls = getattr(importlib.import_module(module), cls)
    if model is None and name in SERVER_BACKENDS:
        raise BadInput(f"the {name} backend needs a model name (e.g. --model llama2:7b)")
    key = URL_OPTIONS.get(name)
    urls = server_urls(str(options.get(key) or "")) if key is not None else []
    if key is not None and len(urls) > 1:
        from core.backends.pool import ServerPool

        return ServerPool([backend_cls(model, **{**options, key: url}) for url in urls])
    return backend_cls(model, **options) if model is not None else backend_cls(**options)
