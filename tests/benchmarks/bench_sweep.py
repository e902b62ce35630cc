"""Sweep throughput, side by side on the same prompts in one run:

- a workbench sweep of 4 configurations x 16 questions on the llamacpp backend (jobs, store commits, scoring
  included; batched decoding, Settings' default parallel sequences) vs raw single-stream
  `llama_cpp.Llama.create_completion` calls on the same prompts and parameters: tokens/s, target >= 1.6x;
- the prompt-sharing effect alone: the batched engine on the same 64 requests with and without sharing;
- aggregate tokens/s of the batched engine against batch size 1, 2, 4, 8, 16, and the physical limit of one
  stream: the weights' bytes read per decoded token over this machine's measured memory bandwidth;
- honesty about numerics: greedy answers to the starter test split, batched vs one at a time: the share that
  are equal and both runs' mean BERTScore F1 (the batched mean must lie in the single-stream run's 95% CI);
- the transformers backend batched (16 prompts at once) vs one prompt at a time, target >= 4x.

Both llama.cpp sides use every core for generation (llama-cpp-python's default is half of them).
"""

from __future__ import annotations

import time

from core import dataset, intake, jobs, models, scoring, settings, stats, sweep
from core.backends import make_backend
from core.backends.base import Request
from core.backends.llamacpp import completion_kwargs
from core.backends.llamacpp_batch import BatchedEngine, _cores
from core.decoding import DecodingParams
from core.prompting import render_prompt, stop_sequences
from core.store import Store
from tests.benchmarks.common import report, scratch_workspace

N_QUESTIONS = 16
PARAMS = DecodingParams(temperature=0.0, max_tokens=64, seed=0)
GRID = {"temperature": [0.0, 0.7], "repeat_penalty": [1.0, 1.1]}
BATCH_SIZES = (1, 2, 4, 8, 16)


def _questions(store: Store) -> list[dataset.StoredPair]:
    return dataset.select_pairs(store, "starter", "test")[:N_QUESTIONS]


def _requests(store: Store) -> list[Request]:
    """What the sweep asks: every configuration of GRID on every question."""
    config = sweep.SweepConfig(dataset="starter", grid=GRID, baseline=PARAMS)
    return [Request(render_prompt(p.question), params) for params in sweep.expand(config) for p in _questions(store)]


def sweep_vs_raw(store: Store) -> dict[str, float]:
    from llama_cpp import Llama

    requests, stop = _requests(store), stop_sequences()
    started = time.perf_counter()
    llm = Llama(model_path=str(models.gguf_path()), n_ctx=2048, n_threads=_cores(), verbose=False)
    raw_tokens = 0
    for request in requests:
        out = llm.create_completion(request.prompt, **completion_kwargs(request.params, stop))
        raw_tokens += out["usage"]["completion_tokens"]
    raw_s = time.perf_counter() - started
    del llm

    config = sweep.SweepConfig(dataset="starter", grid=GRID, baseline=PARAMS, part="test", limit=N_QUESTIONS)
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
    counter = BatchedEngine(str(models.gguf_path()))  # the engine's own tokenizer
    sweep_tokens = sum(counter.count_tokens(a) for a in answers)
    return {
        "sweep_tok_s": sweep_tokens / sweep_s,
        "raw_llama_tok_s": raw_tokens / raw_s,
        "sweep_answers": len(answers),
        "sweep_parallel": settings.load(store).llamacpp_parallel,
    }


def _engine_rate(engine: BatchedEngine, requests: list[Request]) -> float:
    before = engine.completion_tokens
    started = time.perf_counter()
    for _ in engine.answers(requests, stop_sequences()):
        pass
    return (engine.completion_tokens - before) / (time.perf_counter() - started)


def prompt_sharing(store: Store, parallel: int) -> dict[str, float]:
    requests, figures = _requests(store), {}
    for share in (True, False):
        engine = BatchedEngine(str(models.gguf_path()), parallel=parallel, share_prompts=share)
        engine.load()
        name = "shared" if share else "unshared"
        figures[f"{name}_tok_s"] = _engine_rate(engine, requests)
        figures[f"{name}_prompt_tokens_read"] = engine.prompt_tokens_read
    return figures


def batch_size_table(store: Store) -> dict[str, float]:
    """Distinct prompts, one configuration: what batching alone gives."""
    requests = [Request(render_prompt(p.question), PARAMS) for p in _questions(store)]
    engine = BatchedEngine(str(models.gguf_path()), parallel=1)
    engine.load()
    figures = {}
    for size in BATCH_SIZES:
        engine.parallel = size  # the same loaded model; the context is made again for the new size
        figures[f"batch{size}_tok_s"] = _engine_rate(engine, requests)
    figures["model_bytes"] = engine.model_bytes()
    return figures


def memory_bandwidth_gb_s() -> float:
    """Read bandwidth: summing a 1 GiB array that no cache holds, best of 3."""
    import numpy as np

    data = np.ones(2**28, dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.nbytes / best / 1e9


def greedy_agreement(store: Store) -> dict[str, float]:
    """The starter test split answered greedily, one at a time and batched; equal answers and mean F1 of each."""
    pairs = dataset.select_pairs(store, "starter", "test")
    requests = [Request(render_prompt(p.question), DecodingParams(temperature=0.0, seed=0)) for p in pairs]
    parallel = settings.load(store).llamacpp_parallel
    texts = {}
    for mode, size in (("single", 1), ("batched", parallel)):
        engine = BatchedEngine(str(models.gguf_path()), parallel=size)
        texts[mode] = [""] * len(requests)
        for answer in engine.answers(requests, stop_sequences()):
            texts[mode][answer.index] = answer.text
        engine.close()
    scorer = scoring.Scorer(scoring.ScorerConfig())
    references = [p.answer for p in pairs]
    figures: dict[str, float] = {
        "greedy_questions": len(pairs),
        "greedy_equal_share": sum(a == b for a, b in zip(texts["single"], texts["batched"])) / len(pairs),
    }
    for mode in ("single", "batched"):
        summary = stats.summarize([s.f1 for s in scorer.score(texts[mode], references, store)])
        figures[f"{mode}_mean_f1"] = summary.mean
        if mode == "single":
            figures["single_f1_ci_low"], figures["single_f1_ci_high"] = summary.ci_low, summary.ci_high
    return figures


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


def main() -> dict:
    with scratch_workspace(), Store() as store:
        intake.ensure_starter(store)
        dataset.make_split(store, "starter", test_size=0.2)
        figures = {**sweep_vs_raw(store)}
        figures.update(prompt_sharing(store, int(figures["sweep_parallel"])))
        figures.update(batch_size_table(store))
        figures["memory_bandwidth_gb_s"] = memory_bandwidth_gb_s()
        figures.update(greedy_agreement(store))
        figures.update(batched_vs_single(store))
    limit = figures["memory_bandwidth_gb_s"] * 1e9 / figures["model_bytes"]
    ratios = {
        "sweep_vs_raw_llama": figures["sweep_tok_s"] / figures["raw_llama_tok_s"],
        "shared_vs_unshared_prompts": figures["shared_tok_s"] / figures["unshared_tok_s"],
        **{f"batch{n}_vs_batch1": figures[f"batch{n}_tok_s"] / figures["batch1_tok_s"] for n in BATCH_SIZES[1:]},
        "one_stream_limit_tok_s": limit,
        "batch1_share_of_limit": figures["batch1_tok_s"] / limit,
        # >= 0 when the batched mean F1 lies inside the single-stream run's 95% CI.
        "batched_f1_inside_single_ci": min(
            figures["batched_mean_f1"] - figures["single_f1_ci_low"],
            figures["single_f1_ci_high"] - figures["batched_mean_f1"],
        ),
        "batched_vs_single": figures["transformers_single_s"] / figures["transformers_batch16_s"],
    }
    return report(
        "sweep_throughput",
        figures,
        ratios,
        {"sweep_vs_raw_llama": ">=1.6", "batched_f1_inside_single_ci": ">=0", "batched_vs_single": ">=4"},
    )


if __name__ == "__main__":
    main()
