"""A stand-in for an Ollama server, so the `ollama` backend is tested through the real client over HTTP.

It speaks the documented REST API (GET /, /api/version, /api/tags, /api/ps; POST /api/show,
/api/generate, /api/chat) with Ollama's shapes: NDJSON streaming by default, a single JSON
object when `"stream": false`, a final chunk with `done`, `done_reason`, counts and durations,
and errors as `{"error": "..."}` with Ollama's status codes and wording.

The "model" is deterministic: the answer echoes the prompt's words (the last user message
for /api/chat), cut after `options.num_predict` words (one word = one token = one stream
chunk) and before the first of `options.stop`. With `temperature > 0` and a `seed`, the
echo starts `seed % len(words)` words in, so a test can see that the seed arrived; greedy
decoding ignores the seed, as real engines do.

Switches, settable at any time: `busy` (503 on generation), `fail_mid_stream` (an error
line inside a 200 stream; a 500 when not streaming), `delay` (seconds before a generation
request is answered, to provoke client timeouts), `chunk_delay` (seconds between stream
chunks), `raw_reply` (when not None, every /api/ request is answered 200 with this JSON value
instead, an array say: a server that is not Ollama, or a broken proxy), `reply` (when not None, a function
of the request body whose text is the answer instead of the echo: a judge model, say). Every request is
recorded (method, path, parsed JSON body), so tests can assert what really went over the wire.

It never binds anything but 127.0.0.1 and never runs a model. `stop()` makes the server
vanish: the port refuses connections and open connections are cut, as when `ollama serve`
is killed; `start()` again brings it back on the same port.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_MODELS = ("standin-tiny:latest", "standin-small:latest")
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
MID_STREAM_MESSAGE = "an error was encountered while running the model: unexpected EOF"
# How many pieces a stream yields before a `fail_mid_stream` error line.
PIECES_BEFORE_FAILURE = 2


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    body: Any  # the parsed JSON body; None for GET or an empty body

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.body.get("options") or {}) if isinstance(self.body, dict) else {}


def full_model_name(name: str) -> str:
    """Ollama's reading of a model name: no tag means `:latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def answer_words(prompt: str, options: Mapping[str, Any]) -> tuple[list[str], str]:
    """The stand-in's answer to a prompt, as words, and its done_reason ("stop" or "length")."""
    words = prompt.split()
    seed = options.get("seed")
    if words and seed is not None and float(options.get("temperature", 0.8)) > 0:
        shift = int(seed) % len(words)
        words = words[shift:] + words[:shift]
    limit = options.get("num_predict")
    reason = "stop"
    if limit is not None and 0 <= int(limit) < len(words):
        words, reason = words[: int(limit)], "length"
    text = " ".join(words)
    cut = min((i for s in options.get("stop") or () if s and (i := text.find(s)) >= 0), default=-1)
    if cut >= 0:  # like Ollama: the answer ends before the first stop string, which is left out
        words, reason = text[:cut].split(), "stop"
    return words, reason


def answer_text(prompt: str, options: Mapping[str, Any] | None = None) -> str:
    """The full answer the stand-in gives to this prompt with these options."""
    return " ".join(answer_words(prompt, options or {})[0])


class OllamaStandin:
    """An Ollama look-alike on 127.0.0.1 and a random free port, served from a thread."""

    @property
    def handler(self) -> type[BaseHTTPRequestHandler]:
        """The API it speaks (a subclass speaks another)."""
        return _Handler

    def __init__(
        self,
        models: Sequence[str] = DEFAULT_MODELS,
        *,
        delay: float = 0.0,
        chunk_delay: float = 0.0,
        busy: bool = False,
        fail_mid_stream: bool = False,
        version: str = "0.0.0-standin",
        port: int = 0,
    ):
        self.models = [full_model_name(m) for m in models]
        self.delay = delay
        self.chunk_delay = chunk_delay
        self.busy = busy
        self.fail_mid_stream = fail_mid_stream
        self.raw_reply: Any = None
        self.reply: Callable[[dict[str, Any]], str] | None = None
        self.version = version
        self.port = port
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> OllamaStandin:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", self.port), self.handler, self)
        self.port = self._server.server_address[1]  # later restarts reuse the same port
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="ollama-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Vanish: stop listening (connections are refused) and cut every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # wakes handlers sleeping in `delay` / `chunk_delay`
        server.shutdown()
        server.server_close()
        server.cut_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> OllamaStandin:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what the tests look at

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()
            self._max_in_flight = self._in_flight

    @property
    def max_concurrent(self) -> int:
        """The most generation requests that were being handled at the same moment."""
        with self._lock:
            return self._max_in_flight

    def has_model(self, name: str) -> bool:
        return full_model_name(name) in self.models

    # -- used by the handler

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _sleep(self, seconds: float) -> bool:
        """Wait; True when the server is being stopped meanwhile (the handler should give up)."""
        return self._stopping.wait(seconds) if seconds > 0 else self._stopping.is_set()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], standin: OllamaStandin):
        self.standin = standin
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or a connection cut by stop() is normal here; anything
        # else is a bug in the stand-in and is printed as usual.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, like Ollama (Go net/http)
    server_version = "ollama-standin"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    @property
    def standin(self) -> OllamaStandin:
        return self.server.standin

    # -- routing

    def do_HEAD(self) -> None:
        self.standin._record(RecordedRequest("HEAD", self.path, None))
        self._send_text(200 if self.path == "/" else 404, "")

    def do_GET(self) -> None:
        self.standin._record(RecordedRequest("GET", self.path, None))
        if self._sent_raw_reply():
            return
        if self.path == "/":
            self._send_text(200, "Ollama is running")
        elif self.path == "/api/version":
            self._send_json(200, {"version": self.standin.version})
        elif self.path == "/api/tags":
            self._send_json(200, {"models": [_model_entry(m) for m in self.standin.models]})
        elif self.path == "/api/ps":
            self._send_json(200, {"models": []})
        else:
            self._send_text(404, "404 page not found")

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            self.standin._record(RecordedRequest("POST", self.path, raw.decode(errors="replace")))
            self._send_json(400, {"error": "invalid character in request body"})
            return
        self.standin._record(RecordedRequest("POST", self.path, body))
        if self._sent_raw_reply():
            return
        if not isinstance(body, dict):
            body = {}
        if self.path == "/api/generate":
            self._generation(body, chat=False)
        elif self.path == "/api/chat":
            self._generation(body, chat=True)
        elif self.path == "/api/show":
            self._show(body)
        else:
            self._send_text(404, "404 page not found")

    def _sent_raw_reply(self) -> bool:
        if self.standin.raw_reply is None or not self.path.startswith("/api/"):
            return False
        self._send_json(200, self.standin.raw_reply)
        return True

    # -- endpoints

    def _show(self, body: dict[str, Any]) -> None:
        name = body.get("model") or body.get("name") or ""
        if not self.standin.has_model(name):
            self._send_json(404, {"error": f"model '{name}' not found"})
            return
        self._send_json(
            200,
            {
                "license": "",
                "modelfile": f"# Modelfile generated by the stand-in\nFROM {full_model_name(name)}\n",
                "parameters": 'stop "<end>"',
                "template": "{{ .Prompt }}",
                "details": _DETAILS,
                "model_info": {"general.architecture": "standin", "general.parameter_count": 1_000_000},
                "capabilities": ["completion"],
                "modified_at": _MODIFIED_AT,
            },
        )

    def _generation(self, body: dict[str, Any], chat: bool) -> None:
        standin, model = self.standin, body.get("model") or ""
        standin._enter()
        try:
            if standin._sleep(standin.delay):
                self.close_connection = True
                return
            if not model:
                self._send_json(400, {"error": "model is required"})
                return
            if standin.busy:
                self._send_json(503, {"error": BUSY_MESSAGE})
                return
            if not standin.has_model(model):
                self._send_json(404, {"error": f'model "{model}" not found, try pulling it first'})
                return
            self._answer(body, model, chat)
        finally:
            standin._leave()

    def _answer(self, body: dict[str, Any], model: str, chat: bool) -> None:
        standin = self.standin
        if chat:
            user = [m for m in body.get("messages") or [] if m.get("role") == "user"]
            prompt = str(user[-1].get("content") or "") if user else ""
        else:
            prompt = str(body.get("prompt") or "")
        if standin.reply is not None:
            words, done_reason = standin.reply(body).split(" "), "stop"
        else:
            words, done_reason = answer_words(prompt, body.get("options") or {})
        pieces = [w if i == 0 else f" {w}" for i, w in enumerate(words)]
        final = {
            "done": True,
            "done_reason": done_reason if prompt else "load",
            "total_duration": 1_000_000 * (len(words) + 1),
            "load_duration": 100_000,
            "prompt_eval_count": len(prompt.split()),
            "prompt_eval_duration": 200_000,
            "eval_count": len(words),
            "eval_duration": 1_000_000 * len(words),
        }
        if not chat:
            final["context"] = list(range(1, len(words) + 1))

        def piece(text: str) -> dict[str, Any]:
            head = {"model": model, "created_at": _now()}
            if chat:
                return {**head, "message": {"role": "assistant", "content": text}}
            return {**head, "response": text}

        if not body.get("stream", True):  # Ollama streams unless told not to
            if standin.fail_mid_stream:
                self._send_json(500, {"error": MID_STREAM_MESSAGE})
            else:
                self._send_json(200, {**piece("".join(pieces)), **final})
            return

        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, text in enumerate(pieces):
            if standin.fail_mid_stream and i == PIECES_BEFORE_FAILURE:
                break
            if i and standin._sleep(standin.chunk_delay):
                self.close_connection = True
                return
            self._send_line({**piece(text), "done": False})
        if standin.fail_mid_stream:
            self._send_line({"error": MID_STREAM_MESSAGE})
        else:
            self._send_line({**piece(""), **final})
        self.wfile.write(b"0\r\n\r\n")

    # -- writing

    def _send_json(self, status: int, payload: Any) -> None:
        self._send_bytes(status, json.dumps(payload).encode(), "application/json; charset=utf-8")

    def _send_text(self, status: int, text: str) -> None:
        self._send_bytes(status, text.encode(), "text/plain; charset=utf-8")

    def _send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_line(self, payload: Any) -> None:
        """One NDJSON line as one HTTP chunk."""
        data = json.dumps(payload).encode() + b"\n"
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))


_MODIFIED_AT = "2024-01-01T00:00:00Z"
_DETAILS = {
    "parent_model": "",
    "format": "gguf",
    "family": "standin",
    "families": ["standin"],
    "parameter_size": "1M",
    "quantization_level": "Q4_K_M",
}


def _model_entry(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": _MODIFIED_AT,
        "size": 1_000_000,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": _DETAILS,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
