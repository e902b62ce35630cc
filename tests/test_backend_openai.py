"""The `openai` backend against a stand-in of an OpenAI-compatible server, through the real `openai` client over
HTTP: every decoding parameter on the wire under the name each server kind takes (none dropped silently), the
same one-line messages as the Ollama backend for a server down, an unknown model, a timeout or a busy server,
and a sweep that pauses when the server vanishes and finishes after resume with every answer exactly once."""

from __future__ import annotations

import pytest

from core import backends, jobs, settings, sweep
from core.backends import OPENAI_SERVERS
from core.backends.openai_api import SERVER_PARAMETERS, OpenAICompatibleBackend, build_completion_request
from core.decoding import DecodingParams
from core.errors import BackendBusy, BackendTimeout, BackendUnavailable, BadInput, ModelNotFound
from core.sweep import SweepConfig
from tests.conftest import wait_until
from tests.openai_standin import OpenAIStandin

PARAMS = DecodingParams(temperature=0.3, top_p=0.8, top_k=12, max_tokens=5, repeat_penalty=1.2, seed=9)


@pytest.fixture
def server():
    with OpenAIStandin() as standin:
        yield standin


def backend(server, server_kind: str = "vllm", **options) -> OpenAICompatibleBackend:
    return OpenAICompatibleBackend("standin-7b", base_url=server.base_url, server=server_kind, **options)


def test_every_server_kind_settings_offers_has_its_parameter_names():
    assert set(SERVER_PARAMETERS) == set(OPENAI_SERVERS)


@pytest.mark.parametrize(
    ("kind", "top_k", "repeat_penalty"),
    [
        ("vllm", "top_k", "repetition_penalty"),
        ("llama-server", "top_k", "repeat_penalty"),
        ("tgi", None, "repetition_penalty"),
    ],
)
def test_every_parameter_goes_over_the_wire_under_the_servers_name(server, kind, top_k, repeat_penalty):
    params = PARAMS if kind != "tgi" else DecodingParams(**{**PARAMS.to_dict(), "top_k": 0})
    [answer] = backend(server, kind).generate(["one two three four five six seven"], params, stop=["six"])
    [body] = server.completions()
    assert body["model"] == "standin-7b" and body["prompt"] == "one two three four five six seven"
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.3, 0.8, 5, 9)
    assert body["stop"] == ["six"] and body["stream"] is False
    assert body[top_k] == 12 if top_k else "top_k" not in body  # TGI takes none: top_k 0 (off) is not sent
    assert body[repeat_penalty] == 1.2
    assert answer == "three four five"  # the stand-in's echo: shifted by seed 9 (of 7 words), 5 tokens, cut at "six"


def test_a_parameter_the_server_cannot_take_is_refused_not_dropped(server):
    with pytest.raises(BadInput, match="takes no repeat_penalty; set repeat_penalty to 1.0"):
        build_completion_request("m", "p", DecodingParams(top_k=0, repeat_penalty=1.2), "openai")
    with pytest.raises(BadInput, match="takes no top_k"):
        backend(server, "tgi").generate(["p"], PARAMS)
    assert server.completions() == []  # nothing was sent
    neutral = build_completion_request("m", "p", DecodingParams(top_k=0, repeat_penalty=1.0), "openai")
    assert "extra_body" not in neutral and "top_k" not in neutral


def test_answers_stream_and_models_are_listed(server):
    pieces = list(backend(server).stream("alpha beta gamma", DecodingParams(temperature=0, max_tokens=2)))
    assert "".join(pieces) == "alpha beta" and len(pieces) == 2
    assert server.completions()[-1]["stream"] is True
    assert backend(server).models() == ["standin-7b", "standin-13b"]


def test_the_same_one_line_messages_as_ollama_for_what_goes_wrong(server):
    with pytest.raises(ModelNotFound, match="has no model 'nope'"):
        OpenAICompatibleBackend("nope", base_url=server.base_url).generate(["p"], PARAMS)
    server.busy = True
    with pytest.raises(BackendBusy, match="is busy"):
        backend(server).generate(["p"], PARAMS)
    server.busy, server.delay = False, 2.0
    with pytest.raises(BackendTimeout, match="did not answer within 0.5 s"):
        backend(server, timeout=0.5).generate(["p"], PARAMS)
    server.stop()
    with pytest.raises(BackendUnavailable, match="is not reachable"):
        backend(server).generate(["p"], PARAMS)
    with pytest.raises(BadInput, match="should look like"):
        OpenAICompatibleBackend("m", base_url="127.0.0.1:8000")


def test_parallel_requests_go_at_once_and_answers_keep_their_order(server):
    server.delay = 0.2
    prompts = [f"prompt number {i}" for i in range(6)]
    answers = backend(server, parallel=3).generate(prompts, DecodingParams(temperature=0, top_k=0))
    assert answers == prompts and server.max_concurrent == 3


def test_settings_configure_the_backend_and_a_missing_url_is_refused(store, server):
    with pytest.raises(BadInput, match="set the OpenAI-compatible server's URL in Settings"):
        settings.backend_for(store, "openai", "standin-7b")
    settings.save(store, settings.WorkbenchSettings(openai_base_url=server.base_url, openai_server="llama-server"))
    made = settings.backend_for(store, "openai", "standin-7b")
    assert (made.base_url, made.server, made.parallel) == (server.base_url, "llama-server", 4)
    with pytest.raises(BadInput, match="needs the name of a model"):
        settings.backend_for(store, "openai")
    assert "openai" in backends.USER_BACKENDS


def test_an_openai_sweep_checks_every_parameter_pauses_when_the_server_vanishes_and_finishes(starter, server):
    server.delay = 0.1
    settings.save(starter, settings.WorkbenchSettings(openai_base_url=server.base_url, openai_parallel=2))
    config = SweepConfig(
        dataset="starter",
        backend="openai",
        model="standin-7b",
        baseline=PARAMS,
        grid={"top_p": [0.5, 0.8], "temperature": [0.0, 0.3]},
        limit=5,
    )
    sweep_id, job_id = sweep.start_sweep(starter, config)
    wait_until(lambda: jobs.get(starter, job_id).done >= 4)
    server.stop()
    job = jobs.wait(starter, job_id, timeout=60)
    assert job.state == "interrupted" and "not reachable" in job.message
    server.start()
    jobs.resume(starter, job_id)
    assert jobs.wait(starter, job_id, timeout=60).state == "done"

    sent = server.completions()
    assert {(b["top_p"], b["temperature"]) for b in sent} == {(0.5, 0.0), (0.8, 0.0), (0.5, 0.3), (0.8, 0.3)}
    assert all((b["top_k"], b["max_tokens"], b["repetition_penalty"], b["seed"]) == (12, 5, 1.2, 9) for b in sent)
    answers = sweep_answers(starter, sweep_id)
    assert len(answers) == 4 * 5 and {r["n"] for r in answers} == {1}  # every answer exactly once


def sweep_answers(store, sweep_id: int) -> list:
    return store.query(
        "SELECT g.run_id, g.pair_id, COUNT(*) AS n FROM generations g JOIN runs r ON r.id = g.run_id"
        " WHERE r.sweep_id = ? GROUP BY g.run_id, g.pair_id",
        (sweep_id,),
    )


def test_a_two_server_sweep_where_one_dies_finishes_on_the_other_with_every_answer_once(starter):
    with OpenAIStandin(delay=0.1) as first, OpenAIStandin(delay=0.1) as second:
        urls = f"{first.base_url}, {second.base_url}"
        settings.save(starter, settings.WorkbenchSettings(openai_base_url=urls, openai_parallel=2))
        config = SweepConfig(
            dataset="starter",
            backend="openai",
            model="standin-7b",
            baseline=PARAMS,
            grid={"temperature": [0.0, 0.3]},
            limit=10,  # of the 11 validation questions
        )
        sweep_id, job_id = sweep.start_sweep(starter, config)
        wait_until(lambda: len(second.completions()) >= 2)
        second.stop()
        job = jobs.wait(starter, job_id, timeout=120)
        assert job.state == "done", job.message  # not paused: the first server took the rest
        answered = len(first.completions()), len(second.completions())
        assert answered[0] > 0 and answered[1] >= 2 and sum(answered) >= 20
        answers = sweep_answers(starter, sweep_id)
        assert len(answers) == 2 * 10 and {r["n"] for r in answers} == {1}


def test_when_every_server_is_gone_the_sweep_pauses_and_resumes_on_the_one_back(starter):
    with OpenAIStandin(delay=0.1) as first, OpenAIStandin(delay=0.1) as second:
        settings.save(starter, settings.WorkbenchSettings(openai_base_url=f"{first.base_url},{second.base_url}"))
        config = SweepConfig(
            dataset="starter", backend="openai", model="standin-7b", baseline=PARAMS, grid={"top_p": [0.5]}, limit=10
        )
        sweep_id, job_id = sweep.start_sweep(starter, config)
        wait_until(lambda: jobs.get(starter, job_id).done >= 2)
        first.stop()
        second.stop()
        job = jobs.wait(starter, job_id, timeout=60)
        assert job.state == "interrupted" and "not reachable" in job.message
        second.start()
        jobs.resume(starter, job_id)
        assert jobs.wait(starter, job_id, timeout=60).state == "done"
        answers = sweep_answers(starter, sweep_id)
        assert len(answers) == 10 and {r["n"] for r in answers} == {1}


def test_several_ollama_hosts_share_the_requests_too(store):
    from core.backends.pool import ServerPool
    from tests.ollama_standin import OllamaStandin

    with OllamaStandin(delay=0.05) as first, OllamaStandin(delay=0.05) as second:
        settings.save(store, settings.WorkbenchSettings(ollama_host=f"{first.url},{second.url}", ollama_parallel=2))
        pool = settings.backend_for(store, "ollama", "standin-tiny")
        assert isinstance(pool, ServerPool) and pool.parallel == 4
        prompts = [f"question {i}" for i in range(12)]
        assert pool.generate(prompts, DecodingParams(temperature=0)) == prompts
        asked = [len([r for r in s.requests if r.path == "/api/generate"]) for s in (first, second)]
        assert sum(asked) == 12 and min(asked) >= 3
