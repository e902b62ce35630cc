"""A generation backend served from a process of its own, so a native crash kills that process only.

The Playground keeps a model loaded between answers inside the long-lived app server; a segfault in
llama.cpp, torch or bitsandbytes there would end the server for every user. Instead `EngineProcess` runs
`python -m workbench engine` (as Ollama runs its llama.cpp runner as a child) and talks to it over its
stdin/stdout, one JSON object a line. When the child dies, the request in flight raises `EngineCrashed`
(a one-line message with the signal) and the next request starts a fresh child.

The child's own stdout is kept for the protocol; anything native code prints goes to its stderr, which is
appended to `$WORKBENCH_HOME/logs/engine.log` (with Python's stack when native code crashes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from core import errors, processes, workspace
from core.decoding import DecodingParams
from core.errors import BackendError, BackendTimeout, BackendUnavailable

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOAD_TIMEOUT_S = 600.0  # a 7B GGUF from a cold disk
REPLY_TIMEOUT_S = 300.0  # between two pieces of an answer: a long prompt on a slow CPU


class EngineCrashed(BackendUnavailable):
    """The engine's process died (a native crash, the OOM killer, a kill); the next request starts a new one."""


def engine_log() -> Path:
    return workspace.home() / "logs" / "engine.log"


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


class EngineProcess:
    """The Backend protocol, served by a child process; `name` is the backend it runs there."""

    def __init__(self, backend: str, model: str | None = None, **options: Any) -> None:
        self.name = backend
        self.model = model
        self.options = options
        self.completion_tokens = 0
        self._proc: subprocess.Popen | None = None
        self._replies: queue.Queue[bytes | None] = queue.Queue()
        self._models: list[str] = []
        # One request at a time: the child answers them in order, and pieces of two streams must not mix.
        self._lock = threading.Lock()

    # ---- the child's lifetime ----

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    def _start(self) -> None:
        log = engine_log()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as err:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "workbench", "engine"],
                cwd=PROJECT_ROOT,
                env={**os.environ, "WORKBENCH_HOME": str(workspace.home())},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,  # a Ctrl-C or a job's killpg aimed at the app does not reach it
            )
        # Replies are read by a thread into a queue, so that waiting for one can time out.
        self._replies = queue.Queue()
        threading.Thread(target=_read_lines, args=(self._proc.stdout, self._replies), daemon=True).start()
        reply = self._request({"op": "open", "backend": self.name, "model": self.model, "options": self.options})
        self._models = reply["models"]

    def start(self) -> EngineProcess:
        """Start the engine and load its model now, so that the first answer does not wait for it."""
        with self._lock:
            self._ensure()
        return self

    def _ensure(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._start()

    def _crashed(self) -> EngineCrashed:
        proc, self._proc = self._proc, None
        try:
            code = proc.wait(timeout=5) if proc else None
        except subprocess.TimeoutExpired:
            assert proc is not None  # only a live process's wait() times out
            proc.kill()
            code = proc.wait()
        return EngineCrashed(
            f"the {self.name} engine's process died of {processes.exit_reason(code)}; the next run starts a fresh"
            f" engine (its last words are in {engine_log()})"
        )

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()

    def __del__(self) -> None:
        self.close()

    # ---- the protocol ----

    def _send(self, message: dict) -> None:
        proc = self._proc
        try:
            if proc is None or proc.stdin is None:  # closed meanwhile
                raise BrokenPipeError
            proc.stdin.write((json.dumps(message) + "\n").encode())
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._crashed() from None

    def _receive(self, timeout: float) -> dict:
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise BackendTimeout(f"the {self.name} engine gave no answer for {timeout:.0f} s; it was stopped") from None
        if line is None:  # its stdout closed: the process is gone
            raise self._crashed()
        reply = json.loads(line)
        if "error" in reply:
            kind = getattr(errors, reply.get("type", ""), None)
            if not (isinstance(kind, type) and issubclass(kind, errors.WorkbenchError)):
                kind = BackendError
            raise kind(reply["error"])
        return reply

    def _request(self, message: dict, timeout: float = LOAD_TIMEOUT_S) -> dict:
        self._send(message)
        return self._receive(timeout)

    # ---- the Backend protocol ----

    def generate(
        self,
        prompts: Sequence[str],
        params: DecodingParams,
        stop: Sequence[str] = (),
        schema: Mapping[str, Any] | None = None,
    ) -> list[str]:
        with self._lock:
            self._ensure()
            message: dict[str, Any] = {"op": "generate", "prompts": list(prompts), "params": dataclasses.asdict(params)}
            message.update(stop=list(stop), schema=None if schema is None else dict(schema))
            reply = self._request(message, REPLY_TIMEOUT_S * max(len(prompts), 1))
        self.completion_tokens = reply["completion_tokens"]
        return reply["answers"]

    def stream(self, prompt: str, params: DecodingParams, stop: Sequence[str] = ()) -> Iterator[str]:
        with self._lock:
            self._ensure()
            self._send({"op": "stream", "prompt": prompt, "params": dataclasses.asdict(params), "stop": list(stop)})
            answering = True  # the child is still producing this answer
            try:
                while True:
                    try:
                        reply = self._receive(REPLY_TIMEOUT_S)
                    except errors.WorkbenchError:  # an error reply, a crash or a timeout ends the answer
                        answering = False
                        raise
                    if reply.get("end"):
                        answering = False
                        self.completion_tokens = reply["completion_tokens"]
                        return
                    yield reply["piece"]
            finally:
                if answering:
                    self._abandon()

    def _abandon(self) -> None:
        """The reader stopped mid-answer (a rerun, a closed tab): stop the child's answer, keep the model."""
        try:
            self._send({"op": "cancel"})
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not self._receive(REPLY_TIMEOUT_S).get("end"):
                pass
        except errors.WorkbenchError:
            self.close()

    def models(self) -> list[str]:
        self.start()
        return self._models


# ---- the child's side: `python -m workbench engine` -------------------------------------------


def serve() -> int:
    """Answer requests from stdin until it closes. Replies go to a private copy of the real stdout."""
    import faulthandler

    faulthandler.enable()  # a native crash leaves the Python stack in the engine log
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # native code that prints to stdout cannot corrupt the protocol
    requests: queue.Queue[dict | None] = queue.Queue()
    cancel = threading.Event()

    def read_requests() -> None:
        for line in sys.stdin:
            message = json.loads(line)
            if message.get("op") == "cancel":
                cancel.set()
            else:
                requests.put(message)
        requests.put(None)

    threading.Thread(target=read_requests, daemon=True).start()

    def reply(**fields: Any) -> None:
        protocol.write(json.dumps(fields) + "\n")

    backend = None
    while (message := requests.get()) is not None:
        try:
            if message["op"] == "open":
                from core.backends import make_backend

                backend = make_backend(message["backend"], message["model"], **message["options"])
                if hasattr(backend, "load"):
                    backend.load()  # a model that cannot load says so now, not at the first answer
                reply(models=backend.models())
                continue
            assert backend is not None  # the parent always sends "open" first
            params = DecodingParams(**message["params"])
            if message["op"] == "generate":
                answers = backend.generate(message["prompts"], params, message["stop"], message.get("schema"))
                reply(answers=answers, completion_tokens=backend.completion_tokens)
            elif message["op"] == "stream":
                cancel.clear()
                print(f"{time.strftime('%H:%M:%S')} engine {os.getpid()}: answering", file=sys.stderr, flush=True)
                # Every backend's stream() is a generator: closing it stops the engine mid-answer.
                pieces = cast(Generator[str, None, None], backend.stream(message["prompt"], params, message["stop"]))
                for piece in pieces:
                    if cancel.is_set():
                        pieces.close()
                        break
                    reply(piece=piece)
                reply(end=True, completion_tokens=backend.completion_tokens)
        except errors.WorkbenchError as exc:
            reply(error=str(exc), type=type(exc).__name__)
        except Exception as exc:  # a bug in the engine: one line here, the traceback in the engine log
            import traceback

            traceback.print_exc()
            reply(error=f"the engine failed: {type(exc).__name__}: {exc}".splitlines()[0], type="BackendError")
    return 0


def describe_engine(timeout: float = 120.0) -> str:
    """The installed llama.cpp engine's CPU features in one line, asked of a process of its own."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "workbench", "engine", "--info"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return f"the llama.cpp engine did not report its features within {timeout:.0f} s"
    if done.returncode == 0:
        return done.stdout.strip()
    reason = (done.stderr.strip().splitlines() or [""])[-1].removeprefix("error: ")
    return f"the llama.cpp engine cannot load here ({processes.exit_reason(done.returncode)}): {reason}".rstrip(": ")


def isolated_backend(name: str, model: str | None = None, **options: Any):
    """A backend for a long-lived process: native engines in a process of their own, servers over HTTP as usual."""
    from core.backends import NATIVE_BACKENDS, make_backend

    if name in NATIVE_BACKENDS:
        return EngineProcess(name, model, **options).start()
    return make_backend(name, model, **options)
