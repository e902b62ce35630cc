"""The embedded engine's batched decoding (core.backends.llamacpp_batch) on the embedded Gemma GGUF.

One sequence at a time it gives exactly llama-cpp-python's `create_completion` answers (the sampler
semantics are the same); several at once, each request keeps its own parameters, a question's prompt is
read once for every configuration asking it, and a sweep stays exactly-once under SIGKILL.
"""

from __future__ import annotations

import os
import signal

import pytest

from core import compare, jobs, models, runs, settings, sweep
from core.backends.base import Request
from core.backends.llamacpp import completion_kwargs
from core.backends.llamacpp_batch import BatchedEngine
from core.decoding import DecodingParams
from core.prompting import DEFAULT_TEMPLATE, render_prompt, stop_sequences
from tests.conftest import wait_until

pytestmark = pytest.mark.slow

QUESTIONS = [
    "How do I choose a sample size for a survey?",
    "What is a confounding variable?",
    "When should I pre-register a study?",
]
PROMPTS = [render_prompt(q) for q in QUESTIONS]
STOP = stop_sequences(DEFAULT_TEMPLATE)
GREEDY = DecodingParams(temperature=0.0, max_tokens=24)
HOT = DecodingParams(temperature=1.2, top_p=0.95, top_k=50, max_tokens=24, repeat_penalty=1.3, seed=5)


@pytest.fixture(scope="module")
def gguf(embedded_models) -> str:
    return str(models.gguf_path())


def single_stream(gguf: str, prompt: str, params: DecodingParams) -> str:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=2048, verbose=False)
    out = llm.create_completion(prompt, **completion_kwargs(params, STOP))
    return out["choices"][0]["text"]


def answers(engine: BatchedEngine, requests: list[Request]) -> list[str]:
    texts = [""] * len(requests)
    for answer in engine.answers(requests, STOP):
        texts[answer.index] = answer.text
    return texts


def test_one_sequence_at_a_time_gives_exactly_the_answers_of_llama_cpp_pythons_create_completion(gguf):
    from core.backends.base import cut_at_stop

    engine = BatchedEngine(gguf, parallel=1)
    for params in (GREEDY, HOT):
        expected = [cut_at_stop(single_stream(gguf, p, params), STOP).strip() for p in PROMPTS[:2]]
        assert answers(engine, [Request(p, params) for p in PROMPTS[:2]]) == expected


def test_samples_spread_over_threads_are_the_tokens_llama_cpps_own_sampler_draws(gguf):
    import llama_cpp

    from core.backends.llamacpp_batch import _add, _Samplers, _Sequence, sampler_chain

    engine = BatchedEngine(gguf, parallel=1)
    tokens = engine.tokenize(PROMPTS[0])  # loads the model
    ctx = engine._context(512)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    for pos, token in enumerate(tokens):
        _add(batch, token, pos, [0], logits=pos == len(tokens) - 1)
    assert llama_cpp.llama_decode(ctx.ctx, batch) == 0
    llama_cpp.llama_batch_free(batch)
    n_vocab, row = engine._model.n_vocab(), len(tokens) - 1
    samplers = _Samplers(n_vocab, threads=2)
    for params in (GREEDY, HOT):
        native = sampler_chain(params, 7, n_vocab)
        spread = [_Sequence(k, 0, 8, (), sampler_chain(params, 7, n_vocab), 0.0, logit_row=row) for k in range(3)]
        for _ in range(10):  # the same logits each time: the seeded chains draw one stream of tokens
            expected = native.sample(ctx, row)
            assert samplers.sample(ctx, spread) == [expected] * 3
    samplers.close()


def test_a_batch_mixes_configurations_each_with_its_own_parameters(gguf):
    engine = BatchedEngine(gguf, parallel=4)
    short = DecodingParams(temperature=0.0, max_tokens=3)
    requests = [Request(PROMPTS[0], short), Request(PROMPTS[0], GREEDY), Request(PROMPTS[1], HOT)]
    texts = answers(engine, requests)
    assert all(texts)
    assert engine.count_tokens(texts[0]) <= 3 < engine.count_tokens(texts[1])
    assert texts[1].startswith(texts[0])  # the same greedy path, cut at 3 tokens
    assert "Question:" not in "".join(texts) and "\n\n" not in "".join(texts)
    assert answers(engine, requests)[2] == texts[2]  # a seeded sample is reproduced in the same batch


def test_a_prompt_asked_by_several_configurations_is_read_once(gguf):
    shared = BatchedEngine(gguf, parallel=4)
    requests = [Request(PROMPTS[0], GREEDY), Request(PROMPTS[0], HOT), Request(PROMPTS[1], GREEDY)]
    answers(shared, requests)
    once = len(shared.tokenize(PROMPTS[0])) + len(shared.tokenize(PROMPTS[1]))
    assert shared.prompt_tokens_read == once

    unshared = BatchedEngine(gguf, parallel=4, share_prompts=False)
    answers(unshared, requests)
    assert unshared.prompt_tokens_read == once + len(shared.tokenize(PROMPTS[0]))


def test_a_request_admitted_while_its_prompt_is_answering_copies_that_prompts_cache(gguf):
    engine = BatchedEngine(gguf, parallel=2)
    two_tokens = DecodingParams(temperature=0.0, max_tokens=2)
    requests = [Request(PROMPTS[0], two_tokens), Request(PROMPTS[0], GREEDY), Request(PROMPTS[0], GREEDY)]
    texts = answers(engine, requests)  # the third takes the first's slot while the second still answers
    assert engine.prompt_tokens_read == len(engine.tokenize(PROMPTS[0])) + 1  # + its last token, for logits
    assert texts[2].split()[:3] == texts[1].split()[:3]  # it answers the question, not a prompt of one token


def test_more_requests_than_slots_each_get_one_answer_and_short_ones_finish_first(gguf):
    engine = BatchedEngine(gguf, parallel=2)
    lengths = [24, 2, 24, 2, 2]
    requests = [Request(PROMPTS[i % 3], DecodingParams(temperature=0.0, max_tokens=n)) for i, n in enumerate(lengths)]
    order = [a.index for a in engine.answers(requests, ())]
    assert sorted(order) == list(range(5))
    assert order.index(1) < order.index(0)  # a finished sequence's slot went on to the next request


def test_stopping_early_frees_every_slot_for_the_next_call(gguf):
    import llama_cpp

    engine = BatchedEngine(gguf, parallel=3)
    stream = engine.answers([Request(p, GREEDY) for p in PROMPTS * 2], STOP)
    next(stream)
    stream.close()  # a cancelled job
    memory = llama_cpp.llama_get_memory(engine._ctx.ctx)
    assert all(llama_cpp.llama_memory_seq_pos_max(memory, s) == -1 for s in range(3))
    assert len(answers(engine, [Request(PROMPTS[0], GREEDY)])) == 1


def test_a_sweep_records_its_engine_mode_and_stays_exactly_once_under_sigkill(starter):
    settings.save(starter, settings.WorkbenchSettings(llamacpp_parallel=4))
    config = sweep.SweepConfig(
        dataset="starter",
        grid={"temperature": [0.0, 0.8]},
        baseline=DecodingParams(max_tokens=32, seed=1),
        part="test",
        limit=4,
        repeats=2,
    )
    sweep_id, job_id = sweep.start_sweep(starter, config)
    members = sweep.sweep_runs(starter, sweep_id)
    assert {r.config["engine"]["mode"] for r in members} == {"batched"}
    assert {r.config["engine"]["parallel"] for r in members} == {4}
    job = wait_until(lambda: (j := jobs.get(starter, job_id)).done >= 3 and j, timeout=300)
    os.kill(job.pid, signal.SIGKILL)
    wait_until(lambda: jobs.get(starter, job_id).state == "interrupted", timeout=15)
    settings.save(starter, settings.WorkbenchSettings(llamacpp_parallel=1))  # a resume keeps the run's own mode
    jobs.resume(starter, job_id)
    job = jobs.wait(starter, job_id, timeout=600)
    assert job.state == "done" and job.done == job.total == 2 * 4 * 2
    counts = starter.query_in(
        "SELECT g.run_id, g.pair_id, g.repeat, COUNT(DISTINCT g.id) AS n, COUNT(s.id) AS scored FROM generations g"
        " LEFT JOIN scores s ON s.generation_id = g.id WHERE g.run_id IN ({ids}) GROUP BY 1, 2, 3",
        [r.id for r in members],
    )
    assert len(counts) == 16 and {(r["n"], r["scored"]) for r in counts} == {(1, 1)}
    assert runs.get_run(starter, members[0].id).config["engine"] == {"mode": "batched", "parallel": 4}
    assert runs.engine_mode(members[0]) == "batched x4"
    assert compare._settings(members[0])["engine"] == "batched x4"  # Compare tells batched runs apart
