"""An LLM judge of answers: its configuration, its prompts, the JSON its replies must follow, and their reading.

A judge is a backend, a model, a mode and a prompt; `judge_stamp` names all of them (the criteria included),
like a scorer's stamp, and verdicts of different stamps are never mixed.

- **pairwise**: the question, the reference answer and two answers; which is better, or a tie. Every pair is
  asked twice, the answers swapped (`ORDERS`); the pair's verdict is the one both orders give, and a pair whose
  verdict follows the order instead of the answers counts towards the judge's position bias.
- **rubric**: a 1-5 score per answer on each of the editable criteria, with a short reason.

A reply is asked for as JSON of a fixed schema, constrained where the engine allows it (Ollama's `format`, a
llama.cpp grammar); a reply that still does not parse is stored as it came and counted, never guessed. The
reason comes first in the schema, so that a model states it before its verdict. This module never reads the
store (core.judging does).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from core.config import Config, option
from core.decoding import DecodingParams
from core.errors import BadInput

MODES = ("pairwise", "rubric")
ORDERS = ("ab", "ba")  # which run's answer is shown first: run_a's (ab) or run_b's (ba)
VERDICTS = ("a", "b", "tie")  # in canonical terms, as core.ratings stores the humans' verdicts
DEFAULT_CRITERIA = (
    "addresses the question",
    "sound method",
    "specific and actionable",
    "agrees with the reference",
)
REASON_CHARS = 240  # a reason longer than this could not end within max_tokens, and would not parse

PAIRWISE_TEMPLATE = """You are judging two answers to a question about research methods.

Question: {question}

Reference answer: {reference}

Answer 1: {first}

Answer 2: {second}

Which answer is better, judged on: {criteria}? Length alone is no merit.
Reply with JSON only: {{"reason": "one sentence", "better": "1", "2" or "tie"}}
JSON:"""

RUBRIC_TEMPLATE = """You are scoring an answer to a question about research methods.

Question: {question}

Reference answer: {reference}

Answer: {answer}

Score the answer from 1 (poor) to 5 (excellent) on each of: {criteria}.
Reply with JSON only: {{"reason": "one sentence", {scores}}}
JSON:"""

_REASON = {"type": "string", "maxLength": REASON_CHARS}


@dataclass(frozen=True)
class JudgeConfig(Config):
    what = "judge setting"

    backend: str = option(
        "llamacpp",
        help="Backend the judge model runs on: llamacpp (the embedded engine), transformers or ollama.",
        choices=("llamacpp", "transformers", "ollama"),
    )
    model: str = option(
        "", help="Judge model; empty: the backend's default (for llamacpp the embedded Gemma 270M, a weak judge)."
    )
    mode: str = option(
        "pairwise",
        help="pairwise: which of two answers is better (asked in both orders); rubric: 1-5 per answer.",
        choices=MODES,
    )
    criteria: tuple[str, ...] = option(DEFAULT_CRITERIA, help="What the judge weighs, comma-separated.")
    max_tokens: int = option(160, help="Tokens a reply may take, its reason included.", min=32, max=1024)

    def _check(self) -> None:
        names = [c.strip() for c in self.criteria]
        if not any(names):
            raise BadInput("a judge needs at least one criterion")
        if len(set(names)) != len(names) or not all(names):
            raise BadInput("a judge's criteria must be distinct and not empty")
        if "reason" in names:
            raise BadInput("'reason' cannot be a criterion: the judge's reply has a reason of its own")

    @property
    def template(self) -> str:
        return PAIRWISE_TEMPLATE if self.mode == "pairwise" else RUBRIC_TEMPLATE

    @property
    def params(self) -> DecodingParams:
        """Greedy and without a repeat penalty: a verdict is asked for once, and JSON repeats its punctuation."""
        return DecodingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=self.max_tokens, repeat_penalty=1.0)

    @property
    def schema(self) -> dict[str, Any]:
        """The JSON schema a reply must follow."""
        if self.mode == "pairwise":
            properties: dict[str, Any] = {"reason": _REASON, "better": {"type": "string", "enum": ["1", "2", "tie"]}}
        else:
            score = {"type": "integer", "enum": [1, 2, 3, 4, 5]}
            properties = {"reason": _REASON, **{c.strip(): score for c in self.criteria}}
        return {"type": "object", "properties": properties, "required": list(properties)}


def judge_stamp(config: JudgeConfig) -> str:
    """Backend, model, mode, criteria, reply length and prompt: verdicts of judges differing in any never mix."""
    digest = hashlib.sha256("\n".join((config.template, *config.criteria)).encode()).hexdigest()[:10]
    return f"{config.backend}:{config.model or 'default'}:{config.mode}:T{config.max_tokens}:{digest}"


def describe(config: JudgeConfig) -> str:
    return f"{config.mode} judge · {config.backend} · {config.model or 'default model'}"


def _criteria(config: JudgeConfig) -> str:
    return "; ".join(c.strip() for c in config.criteria)


def pairwise_prompt(config: JudgeConfig, question: str, reference: str, first: str, second: str) -> str:
    return PAIRWISE_TEMPLATE.format(
        question=question.strip(),
        reference=reference.strip(),
        first=first.strip(),
        second=second.strip(),
        criteria=_criteria(config),
    )


def rubric_prompt(config: JudgeConfig, question: str, reference: str, answer: str) -> str:
    scores = ", ".join(f'"{c.strip()}": 1 to 5' for c in config.criteria)
    return RUBRIC_TEMPLATE.format(
        question=question.strip(),
        reference=reference.strip(),
        answer=answer.strip(),
        criteria=_criteria(config),
        scores=scores,
    )


def _json_object(reply: str) -> dict[str, Any] | None:
    """The reply's JSON object: the whole reply, or failing that its first {...} span (a chatty, unconstrained
    model); None when neither is an object."""
    text = reply.strip()
    candidates = [text]
    start, end = text.find("{"), text.find("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


@dataclass(frozen=True)
class Reading:
    """What a reply says: a choice ('1', '2' or 'tie') or scores per criterion, and its reason; `parsed` is
    False when the reply is not JSON of the schema (nothing of it is then used)."""

    parsed: bool
    reason: str = ""
    choice: str | None = None
    scores: dict[str, int] | None = None


def read_pairwise(reply: str) -> Reading:
    value = _json_object(reply)
    better = None if value is None else str(value.get("better", "")).strip().lower()
    if value is None or better not in ("1", "2", "tie"):
        return Reading(False)
    return Reading(True, str(value.get("reason", "")), choice=better)


def read_rubric(config: JudgeConfig, reply: str) -> Reading:
    value = _json_object(reply)
    if value is None:
        return Reading(False)
    scores = {}
    for criterion in (c.strip() for c in config.criteria):
        raw = value.get(criterion)
        if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= 5:
            return Reading(False)
        scores[criterion] = raw
    return Reading(True, str(value.get("reason", "")), scores=scores)


def canonical(choice: str, order: str) -> str:
    """A choice of the answer shown first or second, as a verdict on run_a and run_b."""
    if choice == "tie":
        return "tie"
    return "a" if (choice == "1") == (order == "ab") else "b"


def pair_verdict(verdict_ab: str | None, verdict_ba: str | None) -> str | None:
    """The pair's verdict when both orders were read and agree; None otherwise (unparseable or flipped)."""
    return verdict_ab if verdict_ab is not None and verdict_ab == verdict_ba else None


def flipped(verdict_ab: str | None, verdict_ba: str | None) -> bool:
    """Both orders read, and the verdict changed with the order: the judge followed position, not answers."""
    return verdict_ab is not None and verdict_ba is not None and verdict_ab != verdict_ba


def rubric_verdict(mean_a: float | None, mean_b: float | None) -> str | None:
    """The pairwise verdict two answers' rubric scores imply (the higher mean wins), for agreement with humans."""
    if mean_a is None or mean_b is None:
        return None
    return "tie" if mean_a == mean_b else ("a" if mean_a > mean_b else "b")
