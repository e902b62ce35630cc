"""Several servers of one kind (Ollama, or OpenAI-compatible) as one backend: requests spread over all of them.

Each server takes as many requests at once as it has parallel slots; a slot takes the next request not yet
answered from one shared queue, so a fast server answers more. A server that goes away (not reachable, or
no answer in time) stops taking requests and the one it was answering goes back in the queue for the
others: the job goes on, and since a caller commits each answer as it comes (`answers`), every request is
answered exactly once. Only when no server is left does the error reach the caller (a job pauses there).
Any other failure (an unknown model, a bad parameter) is the caller's at once: another server would
refuse it the same way.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from typing import Any

from core.backends.base import Answer, Request
from core.decoding import DecodingParams
from core.errors import BackendError, BackendTimeout, BackendUnavailable

GONE = (BackendUnavailable, BackendTimeout)  # what makes a server leave the pool


class _Run:
    """What the slots of one `answers` call share: the requests, the queue of those not yet taken, the answers
    and departures for the caller's thread, the servers gone, and the signal to stop."""

    def __init__(self, requests: Sequence[Request], stop: Sequence[str]):
        self.requests, self.stop = requests, stop
        self.todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.done: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.down: set[int] = set()
        self.closing = threading.Event()


class ServerPool:
    """Backends of the same kind on different servers, used as one."""

    def __init__(self, servers: Sequence[Any]):
        if not servers:
            raise ValueError("a pool needs at least one server")
        self.servers = list(servers)
        self.name = self.servers[0].name
        self.parallel = sum(int(getattr(s, "parallel", 1)) for s in self.servers)
        self.left: list[str] = []  # the servers that went away, with why, in the order they did

    def __repr__(self) -> str:
        return f"ServerPool({self.servers!r})"

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.servers)

    def answers(self, requests: Sequence[Request], stop: Sequence[str] = ()) -> Generator[Answer, None, None]:
        """Every request's answer as soon as a server has it; closing the generator stops the slots after their
        request in flight."""
        run = _Run(requests, stop)
        for index in range(len(requests)):
            run.todo.put(index)
        slots = [
            threading.Thread(target=self._slot, args=(server, run), name=f"{self.name}-pool", daemon=True)
            for server in self.servers
            for _ in range(int(getattr(server, "parallel", 1)))
        ]
        for slot in slots:
            slot.start()
        alive, remaining, failure = len(slots), len(requests), None
        try:
            while remaining and alive:
                kind, value = run.done.get()
                if kind == "answer":
                    remaining -= 1
                    yield value
                elif kind == "gone":
                    alive, failure = alive - 1, value
                else:  # "failed": a failure another server would repeat
                    raise value
            if remaining:
                raise failure or BackendError(f"no {self.name} server is left to answer")
        finally:
            run.closing.set()

    def _slot(self, server: Any, run: _Run) -> None:
        """One parallel slot of a server: take the next request, answer it, until the pool closes or the server
        goes away (its request back in the queue for the others)."""
        while not run.closing.is_set():
            if id(server) in run.down:  # another slot of this server found it gone
                run.done.put(("gone", None))
                return
            try:
                index = run.todo.get(timeout=0.05)
            except queue.Empty:  # all taken for now; one may come back from a server that goes away
                continue
            request, began = run.requests[index], time.monotonic()
            try:
                [text] = server.generate([request.prompt], request.params, run.stop, request.schema)
            except GONE as exc:
                run.todo.put(index)
                if id(server) not in run.down:
                    run.down.add(id(server))
                    self._leave(server, exc)
                run.done.put(("gone", exc))
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
                run.done.put(("failed", exc))
                return
            run.done.put(("answer", Answer(index, text, time.monotonic() - began)))

    def _leave(self, server: Any, exc: BaseException) -> None:
        where = getattr(server, "base_url", None) or getattr(server, "host", "?")
        self.left.append(f"{where}: {exc}")

    # -- the rest of the Backend protocol

    def generate(
        self,
        prompts: Sequence[str],
        params: DecodingParams,
        stop: Sequence[str] = (),
        schema: Mapping[str, Any] | None = None,
    ) -> list[str]:
        texts: dict[int, str] = {}
        for answer in self.answers([Request(p, params, schema) for p in prompts], stop):
            texts[answer.index] = answer.text
        return [texts[i] for i in range(len(prompts))]

    def stream(self, prompt: str, params: DecodingParams, stop: Sequence[str] = ()) -> Iterator[str]:
        """From the first server that answers (a stream that broke midway is not resumed elsewhere)."""
        error: BackendError | None = None
        for server in self.servers:
            started = False
            try:
                for piece in server.stream(prompt, params, stop):
                    started = True
                    yield piece
                return
            except GONE as exc:
                if started:
                    raise
                error = exc
        raise error or BackendError(f"no {self.name} server is left to answer")

    def models(self) -> list[str]:
        """The models every server of the pool serves."""
        listed = [set(server.models()) for server in self.servers]
        return sorted(set.intersection(*listed))

    def close(self) -> None:
        for server in self.servers:
            if hasattr(server, "close"):
                server.close()
