"""Generating candidate QA pairs with an LLM: the `generate-qa` job kind.

Two prompts, both editable and saved with every pair's provenance: one asks the model for a
research question about a topic, the other for an answer to it. Output that is not a usable
pair (no question found, a duplicate, an empty or runaway answer) is dropped and counted,
never stored. Every good pair is committed as `pending` the moment it exists, so a resumed
job only makes the pairs still missing.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from core import dataset, formats, settings
from core.backends import USER_BACKENDS
from core.config import Config, option
from core.decoding import DecodingParams
from core.errors import BackendError, BadInput
from core.jobs import JobContext, JobPaused

DEFAULT_QUESTION_PROMPT = (
    "Questions a careful researcher asks about how to do research in {topic}:\n"
    "1. How should a researcher choose fair baselines for a new method?\n"
    "2. What is the best way to check that an improvement is not due to chance?\n"
    "3."
)
DEFAULT_ANSWER_PROMPT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class QAGenerationConfig(Config):
    what = "QA generation setting"

    dataset: str = option(help="dataset the pending pairs go to (created if new)")
    topics: list[str] = option(help="research fields or topics, e.g. 'nlp; systems; hci'")
    # No range: _check's message says what the number is ("number of pairs"), which the generic one would not.
    n: int = option(10, help="number of pairs to generate")
    backend: str = option(
        "llamacpp",
        help="backend that generates (llamacpp, transformers, ollama, openai)",
        choices=(*USER_BACKENDS, "echo"),
    )
    model: str = option(
        "", help="model name or path; empty: the Settings' generator for this backend, else the embedded model"
    )
    question_prompt: str = option(DEFAULT_QUESTION_PROMPT, help="prompt asking for one question; must contain {topic}")
    answer_prompt: str = option(DEFAULT_ANSWER_PROMPT, help="prompt asking for the answer; must contain {question}")
    question_params: DecodingParams = option(
        DecodingParams(temperature=0.9, top_p=0.95, max_tokens=48, repeat_penalty=1.1),
        help="decoding parameters for the question prompt (one line, sampled widely for varied questions)",
    )
    answer_params: DecodingParams = option(
        DecodingParams(temperature=0.7, top_p=0.9, max_tokens=160, repeat_penalty=1.15),
        help="decoding parameters for the answer prompt (an answer that reaches max_tokens is dropped as runaway)",
    )
    min_answer_words: int = option(8, help="shorter answers are dropped", min=0)

    def _check(self) -> None:
        if not 1 <= self.n <= 10_000:
            raise BadInput(f"number of pairs must be between 1 and 10000, got {self.n}")
        if not [t for t in self.topics if t.strip()]:
            raise BadInput("give at least one topic")
        for name, placeholder in (("question_prompt", "{topic}"), ("answer_prompt", "{question}")):
            template = getattr(self, name)
            if placeholder not in template:
                raise BadInput(f"the {name.replace('_', ' ')} must contain {placeholder}")
            try:
                template.format(topic="t", question="q")
            except (KeyError, IndexError, ValueError) as exc:
                raise BadInput(f"the {name.replace('_', ' ')} has an unknown placeholder: {exc}") from None


def parse_topics(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"[;\n,]", text) if t.strip()]


_LEADER = re.compile(r"^\s*(?:\d+[.)]|[-*•]|Q\d*[:.]|Question\s*\d*[:.])?\s*")


def parse_question(text: str) -> str | None:
    """The question in a model's reply: its first line, up to the first '?', 4-40 words; else None."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = _LEADER.sub("", line).strip().strip("\"'“”")
    if "?" not in line:
        return None
    question = line[: line.index("?") + 1].strip()
    return question if 4 <= len(question.split()) <= 40 else None


def drop_reason(answer: str, ran_to_limit: bool, min_words: int) -> str | None:
    """Why a generated answer cannot be stored, or None when it can."""
    if not answer.strip():
        return "empty answer"
    if ran_to_limit:
        return "runaway length"
    if len(answer.split()) < min_words:
        return "answer too short"
    return None


def _normalise(question: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", question.lower()).split())


def submit(store, config: QAGenerationConfig) -> int:
    """Check the request, then start it as a background job; returns the job id."""
    from core import jobs

    dataset.check_target(store, config.dataset)  # refuse a bad name now, not after generating
    settings.resolve_generator(store, config.backend, config.model)  # refuse a missing model before starting
    return jobs.submit(store, "generate-qa", config.to_dict())


def generate_pairs(ctx: JobContext, config: QAGenerationConfig) -> None:
    store = ctx.store
    model = settings.resolve_generator(store, config.backend, config.model)
    provenance = {
        "job_id": ctx.job_id,
        "backend": config.backend,
        "model": model,
        "question_prompt": config.question_prompt,
        "answer_prompt": config.answer_prompt,
        "question_params": config.question_params.to_dict(),
        "answer_params": config.answer_params.to_dict(),
    }
    made = store.query("SELECT COUNT(*) FROM pairs WHERE json_extract(provenance, '$.job_id') = ?", (ctx.job_id,))[0][0]
    names = dataset.list_datasets(store)
    seen = set()
    if config.dataset in names:
        seen = {_normalise(q) for q in dataset.pairs_frame(store, config.dataset)["question"]}
    dropped: Counter[str] = Counter(ctx.figures().get("dropped", {}))
    topics = [t.strip() for t in config.topics if t.strip()]
    ctx.progress(made, config.n, f"{made}/{config.n} pairs")
    try:
        backend = settings.backend_for(store, config.backend, model)
        attempts, max_attempts = 0, 5 * (config.n - made) + 10
        while made < config.n and attempts < max_attempts:
            ctx.check_cancel()
            topic = topics[(made + attempts) % len(topics)]
            attempts += 1
            reply = backend.generate([config.question_prompt.format(topic=topic)], config.question_params, ["\n"])
            question = parse_question(reply[0])
            reason = None
            if question is None:
                reason = "no question found"
            elif _normalise(question) in seen:
                reason = "duplicate question"
            if reason is None:
                before = backend.completion_tokens
                answer = backend.generate(
                    [config.answer_prompt.format(question=question, topic=topic)],
                    config.answer_params,
                    ["\n\n", "\nQuestion:"],
                )[0]
                ran_to_limit = backend.completion_tokens - before >= config.answer_params.max_tokens
                reason = drop_reason(answer, ran_to_limit, config.min_answer_words)
            if reason:
                dropped[reason] += 1
                ctx.log(f"dropped ({reason}): {(question or reply[0])[:120]!r}")
                ctx.progress(made, config.n, dropped=dict(dropped))
                continue
            assert question is not None  # a reply without one was dropped above
            dataset.add_pairs(
                store,
                config.dataset,
                [formats.PairRow(question, answer.strip(), topic)],
                "pending",
                source=f"generate-qa job {ctx.job_id}",
                provenance={**provenance, "topic": topic},
            )
            seen.add(_normalise(question))
            made += 1
            ctx.progress(
                made, config.n, f"{made}/{config.n} pairs, {sum(dropped.values())} dropped", dropped=dict(dropped)
            )
    except BackendError as exc:
        raise JobPaused(f"paused: {exc}") from None
    finally:
        if made:
            from core import quality

            quality.flag_dataset(store, config.dataset)
    summary = f"{made} pair(s) stored as pending; dropped {sum(dropped.values())}"
    if dropped:
        summary += " (" + ", ".join(f"{v} {k}" for k, v in dropped.most_common()) + ")"
    ctx.log(summary)
    ctx.progress(made, config.n, summary, dropped=dict(dropped))
    if made < config.n:
        raise BadInput(f"stopped after {attempts} attempts: {summary}; try other prompts or parameters")


def run_generate_qa_job(ctx: JobContext) -> None:
    generate_pairs(ctx, QAGenerationConfig.from_dict(ctx.params))
