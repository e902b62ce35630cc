"""A stand-in for an OpenAI-compatible server (vLLM, llama-server, TGI, LM Studio), so the `openai` backend is
tested through the real `openai` client over HTTP.

It speaks what the backend uses of the API: GET /v1/models, POST /v1/completions (one JSON object, or
server-sent events ending in `data: [DONE]` when `"stream": true`), errors as `{"error": {"message": ...}}` with
the API's status codes. Its "model" is the Ollama stand-in's echo (tests.ollama_standin.answer_words), read from
the API's names: `max_tokens` words, cut before the first `stop`, shifted by `seed` when sampling. Every request
is recorded with its parsed JSON body, so a test sees each parameter on the wire under the name it went by.
The lifecycle (start, stop to vanish and cut connections, a fixed port across restarts, `delay`, `busy`,
`reply`) is the Ollama stand-in's. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.ollama_standin import BUSY_MESSAGE, OllamaStandin, RecordedRequest, _Handler, answer_words

DEFAULT_MODELS = ("standin-7b", "standin-13b")


class OpenAIStandin(OllamaStandin):
    """An OpenAI-compatible server look-alike on 127.0.0.1 and a random free port, served from a thread."""

    def __init__(self, models: Sequence[str] = DEFAULT_MODELS, **options: Any):
        super().__init__(**options)
        self.models = list(models)  # served as named: no `:latest` tags here

    @property
    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _OpenAIHandler

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def has_model(self, name: str) -> bool:
        return name in self.models

    def completions(self) -> list[dict[str, Any]]:
        """The bodies of the completion requests received, in order."""
        return [r.body for r in self.requests if r.path == "/v1/completions"]


class _OpenAIHandler(_Handler):
    server_version = "openai-standin"

    def do_GET(self) -> None:
        self.standin._record(RecordedRequest("GET", self.path, None))
        if self.path == "/v1/models":
            models = [{"id": m, "object": "model", "created": 0, "owned_by": "standin"} for m in self.standin.models]
            self._send_json(200, {"object": "list", "data": models})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.loads(raw) if raw else {}
        self.standin._record(RecordedRequest("POST", self.path, body))
        if self.path != "/v1/completions":
            self._error(404, f"no route {self.path}")
            return
        standin = self.standin
        standin._enter()
        try:
            if standin._sleep(standin.delay):
                self.close_connection = True
                return
            if standin.busy:
                self._error(503, BUSY_MESSAGE)
            elif not standin.has_model(body.get("model", "")):
                self._error(404, f"The model `{body.get('model')}` does not exist.")
            else:
                self._complete(body)
        finally:
            standin._leave()

    def _complete(self, body: dict[str, Any]) -> None:
        options = {"num_predict": body.get("max_tokens"), "stop": body.get("stop"), "seed": body.get("seed")}
        options["temperature"] = body.get("temperature", 1.0)
        if self.standin.reply is not None:
            words, reason = self.standin.reply(body).split(), "stop"
        else:
            words, reason = answer_words(
                str(body.get("prompt", "")), {k: v for k, v in options.items() if v is not None}
            )
        text = " " + " ".join(words)
        usage = {"prompt_tokens": len(str(body.get("prompt", "")).split()), "completion_tokens": len(words)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        head = {"id": "cmpl-standin", "object": "text_completion", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            self._send_json(200, {**head, "choices": [choice], "usage": usage})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        pieces = [" " + w for w in words] + [None]
        for piece in pieces:
            choice = {"index": 0, "text": piece or "", "finish_reason": None if piece else reason, "logprobs": None}
            self._chunk(f"data: {json.dumps({**head, 'choices': [choice]})}\n\n")
        self._chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _error(self, status: int, message: str) -> None:
        kind = {404: "NotFoundError", 503: "ServiceUnavailableError"}.get(status, "BadRequestError")
        self._send_json(status, {"error": {"message": message, "type": kind, "code": status}})
