"""Sweep throughput, side by side on the same prompts in one run:

- a workbench sweep on the llamacpp backend (jobs, store commits, scoring included) vs raw
  `llama_cpp.Llama` calls: generated tokens per second, target >= 0.8x;
- the transformers backend batched (16 prompts at once) vs one prompt at a time, target >= 4x;
- scoring a run with cached reference embeddings vs a plain `bert_score.score` call, target >= 1.5x.
"""

from __future__ import annotations

import os
import tempfile
import time

from core import dataset, intake, jobs, models, scoring, sweep, workspace
from core.backends import make_backend
from core.decoding import DecodingParams
from core.prompting import render_prompt, stop_sequences
from core.store import Store
from tests.benchmarks.common import report

N_QUESTIONS = 16
PARAMS = DecodingParams(temperature=0.0, max_tokens=64, seed=0)


def _questions(store: Store) -> list[dataset.StoredPair]:
    return dataset.select_pairs(store, "starter", "test")[:N_QUESTIONS]


def sweep_vs_raw(store: Store) -> dict[str, float]:
    from llama_cpp import Llama

    pairs = _questions(store)
    prompts = [render_prompt(p.question) for p in pairs]
    stop = stop_sequences()

    started = time.perf_counter()
    llm = Llama(model_path=str(models.gguf_path()), n_ctx=2048, verbose=False)
    raw_tokens = 0
    for prompt in prompts:
        out = llm.create_completion(
            prompt,
            max_tokens=PARAMS.max_tokens,
            temperature=0.0,
            top_p=PARAMS.top_p,
            top_k=PARAMS.top_k,
            repeat_penalty=PARAMS.repeat_penalty,
            seed=0,
            stop=stop,
        )
        raw_tokens += out["usage"]["completion_tokens"]
    raw_s = time.perf_counter() - started
    del llm

    # The test part, like the raw llama.cpp loop above: the same questions on both sides.
    config = sweep.SweepConfig(
        dataset="starter", grid={"temperature": [0.0]}, baseline=PARAMS, part="test", limit=N_QUESTIONS
    )
    sweep_id = sweep.create_sweep(store, config)
    job_id = jobs.submit(store, "sweep", {"sweep_id": sweep_id}, start=False)
    started = time.perf_counter()
    ctx = jobs.JobContext(store, job_id, {"sweep_id": sweep_id})
    sweep.run_sweep_job(ctx)  # in this process: the same work the job's own process does
    sweep_s = time.perf_counter() - started
    answers = [
        r["answer"]
        for r in store.query(
            "SELECT answer FROM generations g JOIN runs r ON r.id = g.run_id WHERE r.sweep_id = ?", (sweep_id,)
        )
    ]
    tokenizer = make_backend("llamacpp").llm  # same tokenizer as the engine
    sweep_tokens = sum(len(tokenizer.tokenize(a.encode(), add_bos=False)) for a in answers)
    return {"sweep_tok_s": sweep_tokens / sweep_s, "raw_llama_tok_s": raw_tokens / raw_s, "sweep_answers": len(answers)}


def batched_vs_single(store: Store) -> dict[str, float]:
    prompts = [render_prompt(p.question) for p in _questions(store)]
    params = DecodingParams(temperature=0.0, max_tokens=32)
    timings = {}
    for batch in (16, 1):
        backend = make_backend("transformers", batch_size=batch)
        backend.generate(prompts[:1], params)  # load and warm up
        started = time.perf_counter()
        backend.generate(prompts, params)
        timings[batch] = time.perf_counter() - started
    return {"transformers_batch16_s": timings[16], "transformers_single_s": timings[1]}


def cached_vs_plain_scoring(store: Store) -> dict[str, float]:
    import bert_score

    pairs = dataset.select_pairs(store, "starter")[:100]
    references = [p.answer for p in pairs]
    # Answer-length candidates that, like model answers, never repeat a reference verbatim.
    candidates = [f"{pairs[i].question} {pairs[(i + 1) % len(pairs)].answer}" for i in range(len(pairs))]

    scorer = scoring.Scorer(scoring.ScorerConfig())
    scorer.score(references, references, store)  # fills the reference cache, as the first run of a dataset does

    started = time.perf_counter()
    scorer.score(candidates, references, store)
    cached_s = time.perf_counter() - started
    started = time.perf_counter()
    bert_score.score(
        candidates,
        references,
        model_type=models.resolve_scorer(None),
        num_layers=models.SCORER_NUM_LAYERS,
        batch_size=64,
    )
    plain_s = time.perf_counter() - started
    return {"score_cached_s": cached_s, "score_plain_bert_score_s": plain_s}


def main() -> dict:
    previous = os.environ.get("WORKBENCH_HOME")
    # The scratch workspace keeps using the prepared embedded models.
    os.environ.setdefault("WORKBENCH_MODELS", str(workspace.models_dir()))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["WORKBENCH_HOME"] = tmp
        try:
            store = Store()
            intake.ensure_starter(store)
            dataset.make_split(store, "starter", test_size=0.2)
            figures = {**sweep_vs_raw(store), **batched_vs_single(store), **cached_vs_plain_scoring(store)}
            store.close()
        finally:
            if previous is None:
                os.environ.pop("WORKBENCH_HOME")
            else:
                os.environ["WORKBENCH_HOME"] = previous
    ratios = {
        "sweep_vs_raw_llama": figures["sweep_tok_s"] / figures["raw_llama_tok_s"],
        "batched_vs_single": figures["transformers_single_s"] / figures["transformers_batch16_s"],
        "cached_vs_plain_scoring": figures["score_plain_bert_score_s"] / figures["score_cached_s"],
    }
    return report(
        "sweep_throughput",
        figures,
        ratios,
        {"sweep_vs_raw_llama": ">=0.8", "batched_vs_single": ">=4", "cached_vs_plain_scoring": ">=1.5"},
    )


if __name__ == "__main__":
    main()
