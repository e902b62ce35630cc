"""The `openai` backend: answers from any server of the OpenAI API, through the official `openai` client.

vLLM, llama.cpp's `llama-server`, TGI and LM Studio all serve `/v1/completions`, so a sweep or an
evaluation can run on a GPU server or a cluster behind one URL. The prompt is sent as it is (the
completions endpoint, not chat: the workbench's prompt template is the whole prompt, as for every
other backend).

The OpenAI API names temperature, top_p, max_tokens, seed and stop; top_k and the repeat penalty are
extensions each server names its own way (`SERVER_PARAMETERS`, read from the servers' request
types): llama-server and LM Studio take `top_k` and `repeat_penalty`, vLLM `top_k` and
`repetition_penalty`, TGI `repetition_penalty` only, OpenAI's own API neither. A parameter the server
has no name for is refused unless it is at its neutral value (top_k 0, repeat penalty 1.0): it is
never dropped silently. Building the request body and turning client exceptions into workbench
errors are pure functions; the client never retries behind the caller's back (max_retries=0).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import openai

from core.backends.base import cut_at_stop, in_parallel, one_line, visible_pieces
from core.decoding import DecodingParams
from core.errors import BackendBusy, BackendError, BackendTimeout, BackendUnavailable, BadInput, ModelNotFound

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
# Server kind -> the names it takes for the parameters outside the OpenAI API (None: it takes none).
SERVER_PARAMETERS: dict[str, dict[str, str | None]] = {
    "llama-server": {"top_k": "top_k", "repeat_penalty": "repeat_penalty"},
    "vllm": {"top_k": "top_k", "repeat_penalty": "repetition_penalty"},
    "lmstudio": {"top_k": "top_k", "repeat_penalty": "repeat_penalty"},
    "tgi": {"top_k": None, "repeat_penalty": "repetition_penalty"},
    "openai": {"top_k": None, "repeat_penalty": None},
}
SERVERS = tuple(SERVER_PARAMETERS)
_NEUTRAL = {"top_k": 0, "repeat_penalty": 1.0}  # the value at which a parameter does nothing
_STANDARD = ("temperature", "top_p", "max_tokens", "seed")  # named by the OpenAI API itself


def build_completion_request(
    model: str, prompt: str, params: DecodingParams, server: str, stop: Sequence[str] = (), stream: bool = False
) -> dict[str, Any]:
    """Keyword arguments for `client.completions.create`: the standard parameters by their API names, the
    server's extensions in `extra_body` by its names. BadInput for a parameter the server cannot take."""
    if server not in SERVER_PARAMETERS:
        raise BadInput(f"unknown OpenAI-compatible server kind {server!r}; choose one of {', '.join(SERVERS)}")
    values = params.to_dict()
    unmapped = set(values) - set(_STANDARD) - set(_NEUTRAL)
    if unmapped:
        raise KeyError(f"DecodingParams.{sorted(unmapped)[0]} has no OpenAI request name; add it to the table")
    request: dict[str, Any] = {"model": model, "prompt": prompt, "stream": stream}
    request |= {name: values[name] for name in _STANDARD if values[name] is not None}
    request["temperature"], request["top_p"] = float(request["temperature"]), float(request["top_p"])
    extra: dict[str, Any] = {}
    for name, neutral in _NEUTRAL.items():
        wire_name = SERVER_PARAMETERS[server][name]
        if wire_name is not None:
            extra[wire_name] = values[name]
        elif values[name] != neutral:
            raise BadInput(
                f"a {server} server takes no {name}; set {name} to {neutral} (off) or choose the server kind that"
                " serves this URL"
            )
    if any(stop):
        request["stop"] = [s for s in stop if s][:4]  # the API takes at most 4
    if extra:
        request["extra_body"] = extra
    return request


def to_backend_error(exc: BaseException, model: str, url: str, *, timeout: float | None = None) -> BackendError:
    """The workbench error, with a one-line message, for an exception from the client."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, openai.APITimeoutError):  # before APIConnectionError, its base class
        within = f" within {timeout:g} s" if timeout is not None else " in time"
        return BackendTimeout(f"the server at {url} did not answer{within} — it may still be loading {model!r}")
    if isinstance(exc, openai.APIConnectionError):
        return BackendUnavailable(f"the server at {url} is not reachable — is it running, and is that its /v1 URL?")
    if isinstance(exc, openai.NotFoundError):
        return ModelNotFound(f"the server at {url} has no model {model!r} (or no /completions route): {_message(exc)}")
    if isinstance(exc, (openai.RateLimitError, openai.InternalServerError)) and exc.status_code in (429, 503):
        return BackendBusy(f"the server at {url} is busy ({_message(exc)}) — try again later or send fewer at once")
    if isinstance(exc, openai.AuthenticationError):
        return BackendError(f"the server at {url} refused the API key (set OPENAI_API_KEY): {_message(exc)}")
    if isinstance(exc, openai.APIStatusError):
        return BackendError(f"the server at {url} failed with {model!r} (HTTP {exc.status_code}): {_message(exc)}")
    if isinstance(exc, openai.OpenAIError):
        return BackendError(f"the server at {url} sent a reply the client cannot read: {one_line(str(exc))}")
    return BackendError(f"the server at {url} failed: {type(exc).__name__}: {one_line(str(exc))}")


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, Mapping):
        error = body.get("error", body)
        text = error.get("message") if isinstance(error, Mapping) else error
        return one_line(str(text or exc.message))
    return one_line(exc.message)


class OpenAICompatibleBackend:
    """Generation through a server of the OpenAI API, one completions request per prompt, `parallel` at once."""

    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str = DEFAULT_BASE_URL,
        server: str = "vllm",
        timeout: float = 120.0,
        parallel: int = 1,
    ):
        if timeout <= 0:
            raise BadInput(f"server timeout must be positive, got {timeout!r}")
        if int(parallel) != parallel or parallel < 1:
            raise BadInput(f"parallel requests must be a whole number >= 1, got {parallel!r}")
        if server not in SERVER_PARAMETERS:
            raise BadInput(f"unknown OpenAI-compatible server kind {server!r}; choose one of {', '.join(SERVERS)}")
        if not base_url.startswith(("http://", "https://")):
            raise BadInput(f"the server URL {base_url!r} should look like {DEFAULT_BASE_URL}")
        self.model, self.base_url, self.server = model, base_url.rstrip("/"), server
        self.timeout, self.parallel = float(timeout), int(parallel)
        self.completion_tokens = 0
        self._count_lock = threading.Lock()
        # A local server needs no key; the client insists on one, so a placeholder goes when none is set.
        key = os.environ.get("OPENAI_API_KEY") or "not-needed"
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout, max_retries=0)

    def __repr__(self) -> str:  # never the key
        return f"OpenAICompatibleBackend(model={self.model!r}, base_url={self.base_url!r}, server={self.server!r})"

    def generate(
        self,
        prompts: Sequence[str],
        params: DecodingParams,
        stop: Sequence[str] = (),
        schema: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """One answer per prompt, in order; up to `parallel` requests in flight. `schema` is not sent: servers
        constrain output each their own way, so the caller reads what comes (as with transformers)."""
        self._require_model()
        requests = [build_completion_request(self.model, p, params, self.server, stop) for p in prompts]
        return in_parallel(lambda r: self._complete(r, stop), requests, self.parallel, "openai")

    def stream(self, prompt: str, params: DecodingParams, stop: Sequence[str] = ()) -> Iterator[str]:
        self._require_model()
        request = build_completion_request(self.model, prompt, params, self.server, stop, stream=True)
        yield from visible_pieces(self._pieces(request), stop)

    def models(self) -> list[str]:
        try:
            return [m.id for m in self._client.models.list()]
        except (openai.OpenAIError, OSError, ValueError) as exc:
            raise to_backend_error(exc, self.model, self.base_url, timeout=self.timeout) from exc

    def close(self) -> None:
        self._client.close()

    def _complete(self, request: dict[str, Any], stop: Sequence[str]) -> str:
        try:
            reply = self._client.completions.create(**request)
        except (openai.OpenAIError, OSError, ValueError) as exc:
            raise to_backend_error(exc, self.model, self.base_url, timeout=self.timeout) from exc
        if not reply.choices:
            raise BackendError(f"the server at {self.base_url} answered with no completion")
        if reply.usage is not None:
            self._count(reply.usage.completion_tokens)
        return cut_at_stop(reply.choices[0].text or "", stop).strip()

    def _pieces(self, request: dict[str, Any]) -> Iterator[str]:
        try:
            for chunk in self._client.completions.create(**request):
                if chunk.choices and chunk.choices[0].text:
                    self._count(1)
                    yield chunk.choices[0].text
        except (openai.OpenAIError, OSError, ValueError) as exc:
            raise to_backend_error(exc, self.model, self.base_url, timeout=self.timeout) from exc

    def _count(self, tokens: int | None) -> None:
        if tokens:
            with self._count_lock:
                self.completion_tokens += int(tokens)

    def _require_model(self) -> None:
        if not self.model:
            raise BadInput("no model chosen for the OpenAI-compatible server — pick one it serves (its /v1/models)")
