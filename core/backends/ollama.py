"""The `ollama` backend: answers from the user's live Ollama server, through the official client.

Building the request body (`build_options`, `build_generate_request`), reading a reply
(`parse_chunk`) and turning client exceptions into workbench errors (`to_backend_error`)
are pure functions, tested without a server; `OllamaBackend` is the thin transport around
`ollama.Client`.

It must never: drop a decoding parameter silently (every `DecodingParams` field has an
Ollama option name, or building the request fails loudly); let a client or httpx exception
escape unconverted (the user sees one line, never a traceback); retry behind the caller's
back; send anything to a host other than the configured one; touch the store or decide what
a prompt looks like (that is core.prompting).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Generator, Iterator, Mapping, Sequence
from typing import Any

import httpx
import ollama

from core.backends.base import cut_at_stop, in_parallel, one_line, visible_pieces
from core.decoding import DecodingParams
from core.errors import (
    BackendBusy,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BadInput,
    ModelNotFound,
)

DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_PORT = 11434

# DecodingParams field -> Ollama option name. Every field must be here: a field missing
# from this table makes build_options raise, instead of being silently not sent.
OLLAMA_OPTION_NAMES: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_tokens": "num_predict",
    "repeat_penalty": "repeat_penalty",
    "seed": "seed",
}

# Everything the client or its httpx transport raises when a request goes wrong:
# ollama.ResponseError / RequestError, httpx.HTTPError (timeouts, dropped connections),
# OSError (the client turns a refused connection into the builtin ConnectionError),
# ValueError (a reply that is not JSON, or an object not shaped like Ollama's) and
# TypeError / AttributeError (a reply that is JSON but no object: the client calls
# `Response(**reply)` and `reply.get(...)` on whatever it parsed, an array say).
_CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    ollama.ResponseError,
    ollama.RequestError,
    httpx.HTTPError,
    OSError,
    ValueError,
    TypeError,
    AttributeError,
)
_UNREADABLE_REPLY = (ValueError, TypeError, AttributeError)

# A connection that was open and then went away (the server stopped or crashed mid-request).
_DROPPED: tuple[type[BaseException], ...] = (
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
    httpx.CloseError,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
)


# --------------------------------------------------------------------------- pure functions


def normalize_host(host: str | None) -> str:
    """`scheme://host:port[/path]` from anything Ollama accepts in OLLAMA_HOST.

    Like Ollama: no scheme means http and port 11434 (`host`, `host:port`, `:port`);
    an explicit `http://` / `https://` without a port means 80 / 443; empty means local.
    """
    text = (host or "").strip()
    if not text:
        return DEFAULT_HOST
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest, default_port = "http", text, DEFAULT_PORT
    elif scheme in ("http", "https"):
        default_port = 80 if scheme == "http" else 443
    else:
        raise BadInput(f"Ollama host {text!r} must use http:// or https://")
    hostport, _, path = rest.partition("/")
    if hostport.startswith("["):  # [ipv6] or [ipv6]:port
        end = hostport.find("]")
        name, port_text = hostport[: end + 1], hostport[end + 1 :].lstrip(":")
    elif hostport.count(":") == 1:
        name, port_text = hostport.split(":")
    elif hostport.count(":") > 1:  # a bare IPv6 address
        name, port_text = f"[{hostport}]", ""
    else:
        name, port_text = hostport, ""
    if port_text and not port_text.isdigit():
        raise BadInput(f"Ollama host {text!r} has a port that is not a number")
    port = int(port_text) if port_text else default_port
    path = path.strip("/")
    return f"{scheme}://{name or '127.0.0.1'}:{port}" + (f"/{path}" if path else "")


def build_options(params: DecodingParams, stop: Sequence[str] = ()) -> dict[str, Any]:
    """Ollama `options` for these decoding parameters; `seed` is left out when None.

    `stop` strings, when given, go in `options.stop`: Ollama ends the answer there itself.
    """
    options: dict[str, Any] = {}
    for field_name, value in params.to_dict().items():
        if field_name not in OLLAMA_OPTION_NAMES:
            raise KeyError(f"DecodingParams.{field_name} has no Ollama option name; add it to the table")
        if value is None:
            continue
        options[OLLAMA_OPTION_NAMES[field_name]] = value
    # Ollama decodes JSON into typed Go fields: whole numbers must stay ints, the rest floats.
    for name in ("temperature", "top_p", "repeat_penalty"):
        options[name] = float(options[name])
    for name in ("top_k", "num_predict", "seed"):
        if name in options:
            options[name] = int(options[name])
    if any(stop):
        options["stop"] = [s for s in stop if s]
    return options


def build_generate_request(
    model: str,
    prompt: str,
    params: DecodingParams,
    stream: bool,
    system: str | None = None,
    stop: Sequence[str] = (),
    schema: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `ollama.Client.generate`, which are also the /api/generate JSON body; a `schema`
    goes in `format`, where Ollama constrains the answer to JSON of that schema."""
    request: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "options": build_options(params, stop),
        "stream": stream,
    }
    if system is not None:
        request["system"] = system
    if schema is not None:
        request["format"] = dict(schema)
    return request


def parse_chunk(chunk: Mapping[str, Any] | ollama.GenerateResponse | ollama.ChatResponse) -> str:
    """The text in one reply or stream chunk (a dict, or the client's response object).

    /api/generate puts it in `response`, /api/chat in `message.content`; the final chunk
    of a stream carries "" and the statistics. A chunk with `error` is Ollama failing after
    it already answered 200 (an error line in the middle of a stream).
    """
    error = chunk.get("error")
    if error:
        raise BackendError(f"Ollama failed mid-answer: {one_line(str(error))}")
    text = chunk.get("response")
    if text is None:
        message = chunk.get("message")
        text = message.get("content") if message is not None else None
    return text or ""


def to_backend_error(exc: BaseException, model: str, host: str, *, timeout: float | None = None) -> BackendError:
    """The workbench error, with a one-line message, for an exception from the client."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, ollama.ResponseError):
        status, message = exc.status_code, one_line(str(exc.error))
        if status == 404 and ("model" in message.lower() or not message):
            return ModelNotFound(
                f"Ollama at {host} has no model {model!r} — run `ollama pull {model}` or pick one from `ollama list`"
            )
        if status == 404:
            return BackendError(f"Ollama at {host} answered 404 ({message}) — is that address an Ollama server?")
        if status in (503, 429):
            return BackendBusy(f"Ollama at {host} is busy ({message}) — try again later or send fewer requests at once")
        if status == -1:  # an error line inside a 200 stream
            return BackendError(f"Ollama at {host} failed mid-answer with {model!r}: {message}")
        return BackendError(f"Ollama at {host} failed with {model!r} (HTTP {status}): {message}")
    if isinstance(exc, httpx.ConnectTimeout):
        return BackendUnavailable(f"Ollama at {host} is not reachable (no connection) — is `ollama serve` running?")
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        within = f" within {timeout:g} s" if timeout is not None else " in time"
        return BackendTimeout(
            f"Ollama at {host} did not answer{within} — {model!r} may still be loading; try again or raise the timeout"
        )
    if isinstance(exc, _DROPPED):
        return BackendUnavailable(f"Ollama at {host} dropped the connection — did the server stop or crash?")
    if isinstance(exc, (ConnectionError, httpx.ConnectError)):  # the client raises ConnectionError
        return BackendUnavailable(f"Ollama at {host} is not reachable — is `ollama serve` running?")
    if isinstance(exc, ollama.RequestError):
        return BackendError(f"Ollama request not sent: {one_line(str(exc.error))}")
    if isinstance(exc, _UNREADABLE_REPLY):
        return BackendError(
            f"Ollama at {host} sent a reply the client cannot read ({one_line(str(exc), 120)}) "
            "— is that address an Ollama server?"
        )
    return BackendError(f"Ollama at {host} failed: {type(exc).__name__}: {one_line(str(exc))}")


# --------------------------------------------------------------------------- transport


class OllamaBackend:
    """Generation through a running Ollama server (`ollama serve`), one HTTP request per prompt."""

    name = "ollama"

    def __init__(self, model: str, host: str | None = None, timeout: float = 120.0, parallel: int = 1):
        if timeout <= 0:
            raise BadInput(f"Ollama timeout must be positive, got {timeout!r}")
        if int(parallel) != parallel or parallel < 1:
            raise BadInput(f"Ollama parallel requests must be a whole number >= 1, got {parallel!r}")
        self.model = model
        self.host = normalize_host(host if host is not None else os.environ.get("OLLAMA_HOST"))
        self.timeout = float(timeout)
        self.parallel = int(parallel)
        self.completion_tokens = 0  # tokens generated so far (Ollama's eval_count), for tokens/s
        self._count_lock = threading.Lock()
        # One client for every thread: httpx.Client is thread-safe and pools connections.
        self._client = ollama.Client(host=self.host, timeout=self.timeout)

    def __repr__(self) -> str:
        return f"OllamaBackend(model={self.model!r}, host={self.host!r}, parallel={self.parallel})"

    # -- the Backend protocol

    def generate(
        self,
        prompts: Sequence[str],
        params: DecodingParams,
        stop: Sequence[str] = (),
        schema: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """One answer per prompt, in order; up to `parallel` requests in flight at once."""
        self._require_model()
        requests = [
            build_generate_request(self.model, p, params, stream=False, stop=stop, schema=schema) for p in prompts
        ]
        return in_parallel(lambda r: self._generate_one(r, stop), requests, self.parallel, "ollama")

    def stream(self, prompt: str, params: DecodingParams, stop: Sequence[str] = ()) -> Iterator[str]:
        """The answer's text pieces as Ollama produces them, trimmed like `generate`'s answer."""
        self._require_model()
        request = build_generate_request(self.model, prompt, params, stream=True, stop=stop)
        raw = self._raw_pieces(request)
        try:
            yield from visible_pieces(raw, stop)
        finally:  # a consumer that stops early ends the HTTP response at once
            raw.close()

    def models(self) -> list[str]:
        """Names of the models pulled on the server (/api/tags), e.g. `llama2:7b`."""
        try:
            listing = self._client.list()
        except _CLIENT_ERRORS as exc:
            raise self._error(exc) from exc
        return [m.model for m in listing.models if m.model]

    # -- extras for Settings and diagnostics

    def version(self) -> str:
        """The server's version (/api/version); also a cheap check that it is up."""
        try:
            # The client has no method for /api/version; _request_raw is its own plumbing
            # for plain requests and raises the same exceptions as every other call.
            version = self._client._request_raw("GET", "/api/version").json().get("version", "")
        except _CLIENT_ERRORS as exc:
            raise self._error(exc) from exc
        return str(version)

    def show(self, model: str | None = None) -> dict[str, Any]:
        """Details of a model (/api/show): family, parameter size, quantization, template, parameters."""
        name = model or self.model
        try:
            info = self._client.show(name)
        except _CLIENT_ERRORS as exc:
            raise self._error(exc, name) from exc
        return info.model_dump(mode="json", exclude_none=True)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OllamaBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals

    def _generate_one(self, request: dict[str, Any], stop: Sequence[str]) -> str:
        try:
            reply = self._client.generate(**request)
        except _CLIENT_ERRORS as exc:
            raise self._error(exc) from exc
        text = parse_chunk(reply)
        self._count(reply.get("eval_count"))
        # Ollama already ends at the stop strings; cutting again costs nothing and keeps
        # every backend's answers alike (no stop string, no surrounding whitespace).
        return cut_at_stop(text, stop).strip()

    def _raw_pieces(self, request: dict[str, Any]) -> Generator[str, None, None]:
        chunks: Iterator[Any] | None = None
        try:
            chunks = self._client.generate(**request)
            for chunk in chunks:
                piece = parse_chunk(chunk)
                if chunk.get("done"):
                    self._count(chunk.get("eval_count"))
                if piece:
                    yield piece
        except _CLIENT_ERRORS as exc:
            raise self._error(exc) from exc
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _count(self, tokens: int | None) -> None:
        if tokens:
            with self._count_lock:
                self.completion_tokens += int(tokens)

    def _error(self, exc: BaseException, model: str | None = None) -> BackendError:
        return to_backend_error(exc, model or self.model, self.host, timeout=self.timeout)

    def _require_model(self) -> None:
        if not self.model:
            raise BadInput("no Ollama model chosen — pick one from `ollama list`")
