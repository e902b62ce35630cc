"""The one protocol every generation backend implements.

A backend turns prompt texts into answers. It never touches the store and never decides
what a prompt looks like (that is core.prompting). `stop` lists strings at which an answer
ends (not included in it). `schema`, when given, is a JSON schema the answer must follow: an engine
that can constrain its output to one does (Ollama's `format`, a llama.cpp grammar); one that cannot
answers freely, and the caller reads what it can (core.judge). `completion_tokens` counts tokens
produced so far, for tokens/s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from core.decoding import DecodingParams
from core.errors import BackendError

T = TypeVar("T")


@runtime_checkable
class Backend(Protocol):
    name: str

    @property
    def completion_tokens(self) -> int:
        """Tokens produced so far, for tokens/s (read-only to callers)."""
        ...

    def generate(
        self,
        prompts: Sequence[str],
        params: DecodingParams,
        stop: Sequence[str] = (),
        schema: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """One answer per prompt, in order."""
        ...

    def stream(self, prompt: str, params: DecodingParams, stop: Sequence[str] = ()) -> Iterator[str]:
        """The answer to one prompt, as text pieces in the order they are produced."""
        ...

    def models(self) -> list[str]:
        """Names of the models this backend can serve."""
        ...


@dataclass(frozen=True)
class Request:
    """One answer asked for: a prompt, the parameters to decode it with, and the JSON schema it must follow."""

    prompt: str
    params: DecodingParams
    schema: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Answer:
    index: int  # the request's position in the list asked
    text: str
    seconds: float  # time spent on it (a batch's time shared by its answers)


def batch_size_for(backend: Backend) -> int:
    """Prompts sharing a configuration go together: transformers batches them, Ollama serves them in parallel."""
    return int(getattr(backend, "batch_size", None) or getattr(backend, "parallel", None) or 1)


def answers_as_done(
    backend: Backend, requests: Sequence[Request], stop: Sequence[str] = ()
) -> Generator[Answer, None, None]:
    """Every request's answer, each as soon as it exists.

    A backend that decodes requests of different parameters together (the embedded engine's `answers`) gets
    them all at once; the others get runs of requests with equal parameters and schema, `batch_size_for` at a time.
    """
    if hasattr(backend, "answers"):
        yield from backend.answers(requests, stop)
        return
    size, start = batch_size_for(backend), 0
    while start < len(requests):
        params, schema = requests[start].params, requests[start].schema
        end = start + 1
        while (
            end < len(requests)
            and end - start < size
            and (requests[end].params, requests[end].schema) == (params, schema)
        ):
            end += 1
        began = time.monotonic()
        texts = backend.generate([r.prompt for r in requests[start:end]], params, stop, schema)
        if len(texts) != end - start:
            raise BackendError(f"{backend.name} returned {len(texts)} answers for {end - start} prompts")
        seconds = (time.monotonic() - began) / (end - start)
        yield from (Answer(start + k, text, seconds) for k, text in enumerate(texts))
        start = end


def in_parallel(work: Callable[[T], str], items: Sequence[T], parallel: int, name: str) -> list[str]:
    """`work` on each item, up to `parallel` at once (threads), results in order; on the first failure the items
    not started yet are never sent (a server's requests, say)."""
    if parallel == 1 or len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(parallel, len(items)), thread_name_prefix=name) as pool:
        futures = [pool.submit(work, item) for item in items]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()


def one_line(text: str, limit: int = 200) -> str:
    """A server's message as one line of at most `limit` characters (what a banner or a job message shows)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text up to the first stop string, for engines that cannot stop by themselves."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def visible_pieces(pieces: Iterator[str], stop: Sequence[str] = ()) -> Iterator[str]:
    """Turn raw streamed pieces into what the user sees: no leading whitespace, ending at a stop string.

    Streaming engines may split a stop string across pieces, so the check runs on the text so far.
    """
    text, shown = "", 0
    for piece in pieces:
        text += piece
        visible = cut_at_stop(text, stop).lstrip()
        stopped = len(cut_at_stop(text, stop)) < len(text)
        # Hold back a tail that might be the start of a stop string still arriving.
        hold = 0 if stopped else max((len(s) - 1 for s in stop if s), default=0)
        ready = visible[: max(len(visible) - hold, shown)]
        if len(ready) > shown:
            yield ready[shown:]
            shown = len(ready)
        if stopped:
            return
    visible = cut_at_stop(text, stop).strip()
    if len(visible) > shown:
        yield visible[shown:]
