"""How the `ollama` backend behaves.

First the pure parts, without any server: decoding parameters become Ollama options,
a reply chunk becomes text, a client exception becomes one workbench error with one line.
Then the whole path, through the official `ollama` client over real HTTP, against the
stand-in server in tests/ollama_standin.py — or against a real Ollama when OLLAMA_HOST is
set (model from OLLAMA_TEST_MODEL); tests that need the stand-in's recorder or failure
switches are then skipped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import httpx
import ollama
import pytest

from core.backends.base import Backend
from core.backends.ollama import (
    DEFAULT_HOST,
    OLLAMA_OPTION_NAMES,
    OllamaBackend,
    build_generate_request,
    build_options,
    normalize_host,
    parse_chunk,
    to_backend_error,
)
from core.decoding import DecodingParams
from core.errors import (
    BackendBusy,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BadInput,
    ModelNotFound,
)
from tests.ollama_standin import MID_STREAM_MESSAGE, PIECES_BEFORE_FAILURE, OllamaStandin, answer_text

HOST = "http://127.0.0.1:11434"

# One non-default value per DecodingParams field, and the Ollama option it must arrive as.
NON_DEFAULT = {
    "temperature": ("temperature", 0.35),
    "top_p": ("top_p", 0.55),
    "top_k": ("top_k", 17),
    "max_tokens": ("num_predict", 9),
    "repeat_penalty": ("repeat_penalty", 1.25),
    "seed": ("seed", 1234),
}
EVERY_FIELD_SET = DecodingParams(**{name: value for name, (_, value) in NON_DEFAULT.items()})
SHORT = DecodingParams(temperature=0.0, max_tokens=8, seed=1)


# --------------------------------------------------------------------------- fixtures


@dataclass
class RealOllama:
    """A real server named by OLLAMA_HOST: no recorder, no switches."""

    url: str
    models: list[str] = field(default_factory=list)
    requests: None = None


@pytest.fixture
def ollama_server() -> Iterator[OllamaStandin | RealOllama]:
    """The stand-in on a fresh port, or the real server at OLLAMA_HOST when that is set."""
    if os.environ.get("OLLAMA_HOST"):
        model = os.environ.get("OLLAMA_TEST_MODEL")
        yield RealOllama(normalize_host(os.environ["OLLAMA_HOST"]), [model] if model else [])
        return
    with OllamaStandin() as standin:
        yield standin


@pytest.fixture
def standin(ollama_server: OllamaStandin | RealOllama) -> OllamaStandin:
    if not isinstance(ollama_server, OllamaStandin):
        pytest.skip("needs the stand-in's request recorder and failure switches (OLLAMA_HOST is set)")
    return ollama_server


@pytest.fixture
def model(ollama_server: OllamaStandin | RealOllama) -> str:
    if not ollama_server.models:
        pytest.skip("set OLLAMA_TEST_MODEL to a model pulled on the server at OLLAMA_HOST")
    return ollama_server.models[0]


@pytest.fixture
def backend(ollama_server: OllamaStandin | RealOllama, model: str) -> Iterator[OllamaBackend]:
    timeout = 5.0 if isinstance(ollama_server, OllamaStandin) else 120.0
    with OllamaBackend(model, host=ollama_server.url, timeout=timeout) as b:
        yield b


def generate_bodies(standin: OllamaStandin) -> list[dict]:
    return [r.body for r in standin.requests if r.path == "/api/generate"]


# --------------------------------------------------------------------------- pure: options


def test_every_decoding_field_has_an_ollama_option_name() -> None:
    # A new DecodingParams field must be mapped here, or it would never reach the server.
    assert set(OLLAMA_OPTION_NAMES) == {f.name for f in fields(DecodingParams)}
    assert set(NON_DEFAULT) == {f.name for f in fields(DecodingParams)}


def test_options_use_ollama_names_and_values() -> None:
    assert build_options(EVERY_FIELD_SET) == {
        "temperature": 0.35,
        "top_p": 0.55,
        "top_k": 17,
        "num_predict": 9,
        "repeat_penalty": 1.25,
        "seed": 1234,
    }


def test_seed_none_is_left_out_so_ollama_picks_a_fresh_one() -> None:
    options = build_options(DecodingParams(seed=None))
    assert "seed" not in options
    assert set(options) == {"temperature", "top_p", "top_k", "num_predict", "repeat_penalty"}


def test_options_keep_whole_numbers_whole_and_the_rest_floats() -> None:
    # Ollama decodes into typed Go fields: num_predict must be an int, temperature a float.
    options = build_options(DecodingParams(temperature=0, top_p=1, repeat_penalty=1, seed=0))
    assert options["temperature"] == 0.0 and isinstance(options["temperature"], float)
    assert isinstance(options["top_p"], float) and isinstance(options["repeat_penalty"], float)
    assert isinstance(options["num_predict"], int) and isinstance(options["top_k"], int)
    assert options["seed"] == 0  # seed 0 is a real seed, not "no seed"


def test_stop_strings_go_in_options_only_when_given() -> None:
    assert build_options(SHORT, stop=["\nQuestion:", ""])["stop"] == ["\nQuestion:"]
    assert "stop" not in build_options(SHORT, stop=())
    assert "stop" not in build_options(SHORT, stop=[""])


def test_generate_request_is_the_json_body() -> None:
    assert build_generate_request("llama2", "What is a p-value?", SHORT, stream=False) == {
        "model": "llama2",
        "prompt": "What is a p-value?",
        "options": build_options(SHORT),
        "stream": False,
    }
    with_system = build_generate_request("llama2", "Q", SHORT, stream=True, system="Answer briefly.")
    assert with_system["system"] == "Answer briefly." and with_system["stream"] is True


# --------------------------------------------------------------------------- pure: replies


@pytest.mark.parametrize(
    "chunk, text",
    [
        ({"model": "m", "response": "Hel", "done": False}, "Hel"),
        ({"model": "m", "response": "", "done": True, "done_reason": "stop", "eval_count": 3}, ""),
        (ollama.GenerateResponse(response="lo", done=False), "lo"),
        ({"message": {"role": "assistant", "content": "Hi"}, "done": False}, "Hi"),
        (ollama.ChatResponse(message=ollama.Message(role="assistant", content="there")), "there"),
    ],
    ids=["generate-chunk", "final-chunk", "client-object", "chat-chunk", "chat-object"],
)
def test_parse_chunk_returns_the_text_piece(chunk, text) -> None:
    assert parse_chunk(chunk) == text


def test_parse_chunk_raises_on_an_error_line_inside_a_stream() -> None:
    with pytest.raises(BackendError, match="unexpected EOF"):
        parse_chunk({"error": "an error was encountered while running the model: unexpected EOF"})


# --------------------------------------------------------------------------- pure: errors


def response_error(status: int, message: str) -> ollama.ResponseError:
    return ollama.ResponseError(json.dumps({"error": message}), status)


UNREACHABLE = f"Ollama at {HOST} is not reachable — is `ollama serve` running?"


@pytest.mark.parametrize(
    "exc, kind, fragment",
    [
        (ConnectionError("Failed to connect to Ollama."), BackendUnavailable, UNREACHABLE),
        (httpx.ConnectError("[Errno 111] Connection refused"), BackendUnavailable, UNREACHABLE),
        (httpx.RemoteProtocolError("Server disconnected"), BackendUnavailable, "dropped the connection"),
        (
            response_error(404, 'model "llama9" not found, try pulling it first'),
            ModelNotFound,
            "`ollama pull llama9`",
        ),
        (ollama.ResponseError("404 page not found", 404), BackendError, "is that address an Ollama server?"),
        (response_error(503, "server busy, please try again."), BackendBusy, "is busy"),
        (httpx.ReadTimeout("timed out"), BackendTimeout, "did not answer within 30 s"),
        (response_error(500, "model requires more system memory\n(8 GiB)"), BackendError, "(HTTP 500)"),
        (
            ollama.ResponseError("unexpected EOF"),
            BackendError,
            "failed mid-answer with 'llama9': unexpected EOF",
        ),
        (json.JSONDecodeError("Expecting value", "<html>", 0), BackendError, "cannot read"),
    ],
    ids=[
        "refused-by-client",
        "refused-in-stream",
        "dropped",
        "unknown-model",
        "404-not-ollama",
        "busy",
        "timeout",
        "server-error",
        "error-mid-stream",
        "not-json",
    ],
)
def test_client_exceptions_become_one_line_workbench_errors(exc, kind, fragment) -> None:
    err = to_backend_error(exc, "llama9", HOST, timeout=30)
    assert type(err) is kind
    assert fragment in str(err)
    assert "\n" not in str(err)


def test_server_message_is_kept_in_the_error() -> None:
    err = to_backend_error(response_error(500, "model requires more system memory"), "llama9", HOST)
    assert "model requires more system memory" in str(err)


def test_a_backend_error_passes_through_unchanged() -> None:
    original = BackendBusy("already mapped")
    assert to_backend_error(original, "m", HOST) is original


# --------------------------------------------------------------------------- pure: host


@pytest.mark.parametrize(
    "given, url",
    [
        (None, DEFAULT_HOST),
        ("", DEFAULT_HOST),
        ("127.0.0.1:5001", "http://127.0.0.1:5001"),
        (":5001", "http://127.0.0.1:5001"),
        ("localhost", "http://localhost:11434"),
        ("http://10.0.0.2", "http://10.0.0.2:80"),
        ("https://ollama.lab:8443/", "https://ollama.lab:8443"),
        ("[::1]:5001", "http://[::1]:5001"),
    ],
)
def test_host_is_read_the_way_ollama_reads_it(given, url) -> None:
    assert normalize_host(given) == url


def test_host_defaults_to_ollama_host_then_local(monkeypatch) -> None:
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    with OllamaBackend("m") as b:
        assert b.host == "http://127.0.0.1:11434"
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:5001")
    with OllamaBackend("m") as b:
        assert b.host == "http://127.0.0.1:5001"


def test_bad_settings_are_bad_input() -> None:
    with pytest.raises(BadInput):
        OllamaBackend("m", host=HOST, parallel=0)
    with pytest.raises(BadInput):
        OllamaBackend("m", host=HOST, timeout=0)
    with pytest.raises(BadInput):
        OllamaBackend("m", host="ftp://127.0.0.1")
    with OllamaBackend("", host=HOST) as no_model, pytest.raises(BadInput, match="no Ollama model"):
        no_model.generate(["q"], SHORT)


def test_it_is_a_backend() -> None:
    with OllamaBackend("m", host=HOST) as b:
        assert isinstance(b, Backend) and b.name == "ollama" and b.completion_tokens == 0


# --------------------------------------------------------------------------- over HTTP: answers


def test_generate_returns_one_answer_per_prompt_in_order(backend, ollama_server) -> None:
    prompts = ["What is a p-value?", "Define statistical power.", "What does a t-test compare?"]
    answers = backend.generate(prompts, SHORT)
    assert len(answers) == 3 and all(isinstance(a, str) and a for a in answers)
    if isinstance(ollama_server, OllamaStandin):
        assert answers == [answer_text(p, build_options(SHORT)) for p in prompts]


def test_no_prompts_means_no_requests(backend, standin) -> None:
    assert backend.generate([], SHORT) == []
    assert generate_bodies(standin) == []


def test_every_decoding_parameter_arrives_in_options(backend, standin) -> None:
    backend.generate(["a b c d e f g h i j k l"], EVERY_FIELD_SET)
    (body,) = generate_bodies(standin)
    assert body["model"] == backend.model and body["prompt"] == "a b c d e f g h i j k l"
    assert body["stream"] is False
    assert body["options"] == {ollama_name: value for ollama_name, value in NON_DEFAULT.values()}


@pytest.mark.parametrize("field_name", list(NON_DEFAULT))
def test_each_parameter_change_reaches_the_server(backend, standin, field_name) -> None:
    ollama_name, value = NON_DEFAULT[field_name]
    backend.generate(["q"], DecodingParams(**{field_name: value}))
    (body,) = generate_bodies(standin)
    assert body["options"][ollama_name] == value


def test_seed_none_is_not_sent(backend, standin) -> None:
    backend.generate(["q"], DecodingParams(seed=None))
    (body,) = generate_bodies(standin)
    assert "seed" not in body["options"]


def test_max_tokens_takes_effect(backend, standin) -> None:
    (answer,) = backend.generate(["one two three four five six"], DecodingParams(max_tokens=4))
    assert answer == "one two three four"  # the stand-in stops after num_predict words


def test_stream_yields_pieces_that_join_to_the_full_answer(backend, ollama_server) -> None:
    prompt = "Explain the difference between precision and recall."
    pieces = list(backend.stream(prompt, SHORT))
    assert pieces and "".join(pieces).strip()
    if isinstance(ollama_server, OllamaStandin):
        assert len(pieces) > 1
        assert "".join(pieces) == backend.generate([prompt], SHORT)[0] == answer_text(prompt, build_options(SHORT))
        stream_body = generate_bodies(ollama_server)[0]
        assert stream_body["stream"] is True and stream_body["options"] == build_options(SHORT)


def test_stop_strings_reach_the_server_and_end_the_answer(backend, ollama_server) -> None:
    prompt = "alpha beta STOP gamma delta"
    (answer,) = backend.generate([prompt], SHORT, stop=["STOP"])
    streamed = "".join(backend.stream(prompt, SHORT, stop=["STOP"]))
    assert "STOP" not in answer and "STOP" not in streamed
    if isinstance(ollama_server, OllamaStandin):
        assert answer == streamed == "alpha beta"
        assert [b["options"]["stop"] for b in generate_bodies(ollama_server)] == [["STOP"], ["STOP"]]


def test_completion_tokens_count_what_ollama_generated(backend, ollama_server) -> None:
    backend.generate(["one two three", "four five"], SHORT)
    after_generate = backend.completion_tokens
    list(backend.stream("six seven eight nine", SHORT))
    assert 0 < after_generate < backend.completion_tokens
    if isinstance(ollama_server, OllamaStandin):  # the stand-in's eval_count is one per word
        assert (after_generate, backend.completion_tokens) == (5, 9)


def test_models_lists_the_server_models(backend, ollama_server, model) -> None:
    names = backend.models()
    assert model in names or f"{model}:latest" in names
    if isinstance(ollama_server, OllamaStandin):
        assert names == ollama_server.models


def test_version_and_show(backend, ollama_server) -> None:
    assert backend.version()
    info = backend.show()
    assert "details" in info
    if isinstance(ollama_server, OllamaStandin):
        assert backend.version() == "0.0.0-standin"
        assert info["details"]["family"] == "standin"


def test_parallel_requests_keep_prompt_order(standin, model) -> None:
    standin.delay = 0.15  # long enough for requests to overlap
    prompts = [f"question number {i}" for i in range(5)]
    with OllamaBackend(model, host=standin.url, timeout=5, parallel=2) as b:
        answers = b.generate(prompts, SHORT)
        assert answers == [answer_text(p, build_options(SHORT)) for p in prompts]
        assert b.completion_tokens == 3 * len(prompts)  # counted safely from several threads
    assert standin.max_concurrent == 2  # overlapping, and never more than `parallel`


# --------------------------------------------------------------------------- over HTTP: failures


def test_unknown_model_is_model_not_found_with_a_one_line_hint(ollama_server) -> None:
    with OllamaBackend("no-such-model-xyz", host=ollama_server.url, timeout=30) as b:
        with pytest.raises(ModelNotFound) as generate_error:
            b.generate(["q"], SHORT)
        with pytest.raises(ModelNotFound):
            list(b.stream("q", SHORT))
        with pytest.raises(ModelNotFound):
            b.show()
    message = str(generate_error.value)
    assert "no-such-model-xyz" in message and "ollama pull no-such-model-xyz" in message
    assert "\n" not in message


def test_busy_server_is_backend_busy(backend, standin) -> None:
    standin.busy = True
    with pytest.raises(BackendBusy, match="is busy"):
        backend.generate(["q"], SHORT)
    with pytest.raises(BackendBusy):
        list(backend.stream("q", SHORT))


def test_error_in_the_middle_of_a_stream_is_backend_error(backend, standin) -> None:
    standin.fail_mid_stream = True
    pieces: list[str] = []
    with pytest.raises(BackendError) as raised:
        for piece in backend.stream("one two three four five", SHORT):
            pieces.append(piece)
    assert type(raised.value) is BackendError and "unexpected EOF" in str(raised.value)
    assert "".join(pieces) == "one two"  # what arrived before the error line
    assert len(pieces) == PIECES_BEFORE_FAILURE
    with pytest.raises(BackendError, match="unexpected EOF"):  # the same failure, not streamed: HTTP 500
        backend.generate(["q"], SHORT)
    assert MID_STREAM_MESSAGE.endswith("unexpected EOF")


def test_slow_server_is_backend_timeout(standin, model) -> None:
    standin.delay = 3.0
    started = time.monotonic()
    with OllamaBackend(model, host=standin.url, timeout=0.3) as b, pytest.raises(BackendTimeout) as raised:
        b.generate(["q"], SHORT)
    assert time.monotonic() - started < 2.0
    assert "did not answer within 0.3 s" in str(raised.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.generate(["q"], SHORT),
        lambda b: list(b.stream("q", SHORT)),
        lambda b: b.models(),
        lambda b: b.version(),
    ],
    ids=["generate", "stream", "models", "version"],
)
def test_stopped_server_is_backend_unavailable(backend, standin, call) -> None:
    assert backend.generate(["q"], SHORT)  # a kept-alive connection now exists
    standin.stop()
    with pytest.raises(BackendUnavailable) as raised:
        call(backend)
    assert standin.url in str(raised.value) and "\n" not in str(raised.value)


def test_refused_connection_names_the_host_and_the_fix(standin, model) -> None:
    url = standin.url
    standin.stop()
    with OllamaBackend(model, host=url, timeout=5) as b, pytest.raises(BackendUnavailable) as raised:
        b.generate(["q"], SHORT)
    assert str(raised.value) == f"Ollama at {url} is not reachable — is `ollama serve` running?"


def test_server_vanishing_mid_stream_is_backend_unavailable(backend, standin) -> None:
    standin.chunk_delay = 0.2
    pieces = backend.stream("one two three four five", SHORT)
    assert next(pieces) == "one"
    standin.stop()
    with pytest.raises(BackendUnavailable):
        list(pieces)


def test_a_server_that_comes_back_is_used_again(backend, standin) -> None:
    standin.stop()
    with pytest.raises(BackendUnavailable):
        backend.generate(["q"], SHORT)
    standin.start()  # same port, as after restarting `ollama serve`
    assert backend.generate(["one two"], SHORT) == ["one two"]
