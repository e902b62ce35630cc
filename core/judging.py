"""Judging two runs' answers with an LLM judge (core.judge), as a job, and what its verdicts say.

`start_judging` records the judge and submits a `judge` job. The job asks the judge about every question both
runs answered (their first repeat's answers, as raters see them): pairwise, each pair in both orders; rubric,
each run's answer. Each reply is committed as soon as it exists, keyed by (judge stamp, question, runs, order),
so a job killed at any moment and resumed asks each exactly once; a backend that fails in a way the user can fix
(a vanished Ollama) pauses the job. A reply that does not parse is stored with no verdict, and counted.

`judge_result` reads a judge's replies on two runs back as win rates with Wilson intervals (pairwise) or
rubric means with bootstrap intervals, and always with the judge's agreement with the blind human ratings of
the same pairs (core.ratings): the share of equal verdicts and Cohen's kappa with its interval, on the human
verdicts for which the judge has one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from core import jobs, ratings, runs, settings, stats
from core.backends.base import Request, answers_as_done
from core.errors import BackendError, BadInput
from core.generation import Tally
from core.jobs import JobContext, JobPaused
from core.judge import (
    ORDERS,
    VERDICTS,
    JudgeConfig,
    canonical,
    describe,
    flipped,
    judge_stamp,
    pair_verdict,
    pairwise_prompt,
    read_pairwise,
    read_rubric,
    rubric_prompt,
    rubric_verdict,
)
from core.store import Store, now


@dataclass(frozen=True)
class _Ask:
    """One reply to ask for: the prompt, and the key it is stored under."""

    prompt: str
    pair_id: int
    run_id: int  # rubric: the run whose answer is scored; pairwise: run_a
    position: str  # pairwise: 'ab' or 'ba'; rubric: ''


def shared_questions(store: Store, run_a: int, run_b: int) -> list[tuple[runs.ds.StoredPair, str, str]]:
    """The questions both runs answered, as run_a froze them, with each run's first answer."""
    answers_a, answers_b = runs.first_answers(store, run_a), runs.first_answers(store, run_b)
    pairs = runs.run_pairs(store, runs.get_run(store, run_a))
    return [(p, answers_a[p.id], answers_b[p.id]) for p in pairs if p.id in answers_a and p.id in answers_b]


def start_judging(store: Store, config: JudgeConfig, run_x: int, run_y: int) -> int:
    """Record the judge and submit the job judging these two runs; returns the job id."""
    run_a, run_b = ratings.canonical_pair(store, run_x, run_y)
    if not shared_questions(store, run_a, run_b):
        raise BadInput(f"runs {run_a} and {run_b} answered no question in common: nothing to judge")
    stamp = judge_stamp(config)
    store.execute(
        "INSERT INTO judges (stamp, config, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        (stamp, json.dumps(config.to_dict()), now()),
    )
    return jobs.submit(store, "judge", {"judge": config.to_dict(), "run_a": run_a, "run_b": run_b})


def _asks(store: Store, config: JudgeConfig, run_a: int, run_b: int) -> list[_Ask]:
    """Every reply this judge gives on these runs, asked or not."""
    out = []
    for pair, answer_a, answer_b in shared_questions(store, run_a, run_b):
        if config.mode == "pairwise":
            for order in ORDERS:
                first, second = (answer_a, answer_b) if order == "ab" else (answer_b, answer_a)
                prompt = pairwise_prompt(config, pair.question, pair.answer, first, second)
                out.append(_Ask(prompt, pair.id, run_a, order))
        else:
            for run_id, answer in ((run_a, answer_a), (run_b, answer_b)):
                out.append(_Ask(rubric_prompt(config, pair.question, pair.answer, answer), pair.id, run_id, ""))
    return out


def _asked(store: Store, config: JudgeConfig, run_a: int, run_b: int) -> set[tuple[int, int, str]]:
    stamp = judge_stamp(config)
    if config.mode == "pairwise":
        rows = store.query(
            "SELECT pair_id, run_a AS run_id, position FROM judge_pairwise WHERE stamp = ? AND run_a = ? AND run_b = ?",
            (stamp, run_a, run_b),
        )
    else:
        rows = store.query(
            "SELECT pair_id, run_id, '' AS position FROM judge_rubric WHERE stamp = ? AND run_id IN (?, ?)",
            (stamp, run_a, run_b),
        )
    return {(r["pair_id"], r["run_id"], r["position"]) for r in rows}


def _commit(store: Store, config: JudgeConfig, ask: _Ask, run_b: int, reply: str, seconds: float) -> None:
    stamp = judge_stamp(config)
    if config.mode == "pairwise":
        reading = read_pairwise(reply)
        verdict = canonical(reading.choice, ask.position) if reading.choice else None
        store.execute(
            "INSERT INTO judge_pairwise (stamp, pair_id, run_a, run_b, position, reply, verdict, reason, seconds,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (stamp, ask.pair_id, ask.run_id, run_b, ask.position, reply, verdict, reading.reason, seconds, now()),
        )
    else:
        reading = read_rubric(config, reply)
        scores = reading.scores
        mean = sum(scores.values()) / len(scores) if scores else None
        store.execute(
            "INSERT INTO judge_rubric (stamp, pair_id, run_id, reply, scores, mean, reason, seconds, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (
                stamp,
                ask.pair_id,
                ask.run_id,
                reply,
                json.dumps(scores) if scores else None,
                mean,
                reading.reason,
                seconds,
                now(),
            ),
        )


def run_judge_job(ctx: JobContext) -> None:
    store = ctx.store
    config = JudgeConfig.from_dict(ctx.params["judge"])
    run_a, run_b = int(ctx.params["run_a"]), int(ctx.params["run_b"])
    asks = _asks(store, config, run_a, run_b)
    asked = _asked(store, config, run_a, run_b)
    todo = [a for a in asks if (a.pair_id, a.run_id, a.position) not in asked]
    tally = Tally(total=len(asks), done=len(asks) - len(todo))
    ctx.progress(tally.done, tally.total, f"runs {run_a} and {run_b}: {len(todo)} replies to ask the judge for")
    try:
        options = {"parallel": settings.load(store).llamacpp_parallel} if config.backend == "llamacpp" else {}
        backend = settings.backend_for(store, config.backend, config.model, **options)
        requests = [Request(a.prompt, config.params, config.schema) for a in todo]
        answers = answers_as_done(backend, requests)
        with contextlib.closing(answers):  # a cancel stops the engine's sequences in flight
            for answer in answers:
                _commit(store, config, todo[answer.index], run_b, answer.text, answer.seconds)
                tally.done += 1
                tally.report(ctx, backend, f"{tally.done}/{tally.total} replies")
                ctx.check_cancel()
    except BackendError as exc:
        raise JobPaused(f"paused: {exc}") from None
    result = judge_result(store, config, run_a, run_b)
    ctx.progress(tally.done, tally.total, f"done: {result.headline()}")


# ---- what the verdicts say --------------------------------------------------------------------


@dataclass(frozen=True)
class HumanAgreement:
    """The judge against the blind human ratings of the same pairs of answers; `agreement` None when no human
    verdict has a judge verdict beside it."""

    human_verdicts: int  # every human verdict on these runs
    compared: int  # those on a question the judge gave a verdict on
    agreement: stats.Agreement | None

    def describe(self) -> str:
        if not self.human_verdicts:
            return "not yet checked against human ratings"
        if self.agreement is None:
            return f"no verdict of the judge on the {self.human_verdicts} human-rated questions yet"
        a = self.agreement
        kappa = "κ n/a" if a.kappa != a.kappa else f"κ {a.kappa:.2f} (95% CI {a.ci_low:.2f} to {a.ci_high:.2f})"
        missing = self.human_verdicts - self.compared
        rest = f"; {missing} more have no verdict of the judge" if missing else ""
        return f"agrees with the humans on {a.equal_share:.0%} of {a.n} human verdicts, {kappa}{rest}"


@dataclass(frozen=True)
class CriterionMean:
    run_id: int
    criterion: str  # "overall": the mean of the criteria
    summary: stats.Summary


@dataclass(frozen=True)
class JudgeResult:
    stamp: str
    config: JudgeConfig
    run_a: int
    run_b: int
    questions: int  # questions both runs answered
    replies: int  # replies stored
    unparseable: int
    verdicts: dict[int, str] = field(default_factory=dict)  # pair_id -> canonical verdict, where there is one
    flipped: int = 0  # pairwise: pairs whose verdict changed with the order
    judged_pairs: int = 0  # pairwise: pairs with both orders' replies stored
    win_rates: ratings.WinRates | None = None  # pairwise, from run_a's side
    means: tuple[CriterionMean, ...] = ()  # rubric
    humans: HumanAgreement = HumanAgreement(0, 0, None)

    @property
    def position_bias(self) -> float:
        """Share of the pairs read in both orders whose verdict flipped with the order."""
        readable = self.flipped + len(self.verdicts)
        return self.flipped / readable if readable else float("nan")

    def headline(self) -> str:
        unparsed = f", {self.unparseable} of {self.replies} replies unparseable"
        if self.config.mode == "pairwise":
            wins = win_rate_text(self.win_rates) if self.win_rates and self.win_rates.n else "no consistent verdict yet"
            bias = "" if self.position_bias != self.position_bias else f", position bias {self.position_bias:.0%}"
            return f"{wins}{bias}{unparsed}; {self.humans.describe()}"
        overall = {m.run_id: m.summary for m in self.means if m.criterion == "overall"}
        scored = ", ".join(f"run {r} {s.mean:.2f}/5" for r, s in overall.items() if s.n)
        return f"rubric means {scored or 'none yet'}{unparsed}; {self.humans.describe()}"


def win_rate_text(w: ratings.WinRates) -> str:
    return f"run {w.run_x} wins {w.win_rate_x:.0%} (95% CI {w.ci_low:.0%}–{w.ci_high:.0%}) of {w.n}"


def judges_of(store: Store, run_x: int, run_y: int) -> list[JudgeConfig]:
    """The judges that have replies on these two runs, oldest first."""
    run_a, run_b = ratings.canonical_pair(store, run_x, run_y)
    rows = store.query(
        "SELECT j.config FROM judges j WHERE EXISTS (SELECT 1 FROM judge_pairwise p WHERE p.stamp = j.stamp"
        " AND p.run_a = ? AND p.run_b = ?) OR (EXISTS (SELECT 1 FROM judge_rubric r WHERE r.stamp = j.stamp"
        " AND r.run_id = ?) AND EXISTS (SELECT 1 FROM judge_rubric r WHERE r.stamp = j.stamp AND r.run_id = ?))"
        " ORDER BY j.created_at",
        (run_a, run_b, run_a, run_b),
    )
    return [JudgeConfig.from_dict(json.loads(r["config"])) for r in rows]


def _human_agreement(store: Store, run_a: int, run_b: int, judged: dict[int, str]) -> HumanAgreement:
    humans = ratings.verdicts(store, run_a, run_b)
    pairs = [(verdict, judged[pair_id]) for _, pair_id, verdict in humans if pair_id in judged]
    if not pairs:
        return HumanAgreement(len(humans), 0, None)
    human, judge = zip(*pairs)
    return HumanAgreement(len(humans), len(pairs), stats.agreement(human, judge, VERDICTS))


def judge_result(store: Store, config: JudgeConfig, run_x: int, run_y: int) -> JudgeResult:
    run_a, run_b = ratings.canonical_pair(store, run_x, run_y)
    stamp = judge_stamp(config)
    questions = {p.id for p, _, _ in shared_questions(store, run_a, run_b)}
    if config.mode == "pairwise":
        rows = store.query(
            "SELECT pair_id, position, verdict FROM judge_pairwise WHERE stamp = ? AND run_a = ? AND run_b = ?",
            (stamp, run_a, run_b),
        )
        by_pair: dict[int, dict[str, str | None]] = {}
        for r in rows:
            by_pair.setdefault(r["pair_id"], {})[r["position"]] = r["verdict"]
        both = {p: v for p, v in by_pair.items() if len(v) == 2}
        verdicts = {p: v for p, o in both.items() if (v := pair_verdict(o["ab"], o["ba"])) is not None}
        return JudgeResult(
            stamp,
            config,
            run_a,
            run_b,
            len(questions),
            len(rows),
            sum(r["verdict"] is None for r in rows),
            verdicts,
            flipped=sum(flipped(o["ab"], o["ba"]) for o in both.values()),
            judged_pairs=len(both),
            win_rates=ratings.win_rates_of(list(verdicts.values()), run_a, run_b),
            humans=_human_agreement(store, run_a, run_b, verdicts),
        )
    rows = store.query(
        "SELECT pair_id, run_id, scores, mean FROM judge_rubric WHERE stamp = ? AND run_id IN (?, ?)",
        (stamp, run_a, run_b),
    )
    rows = [r for r in rows if r["pair_id"] in questions]
    scores = {(r["pair_id"], r["run_id"]): json.loads(r["scores"]) for r in rows if r["scores"]}
    means = []
    for run_id in (run_a, run_b):
        mine = [s for (_, owner), s in scores.items() if owner == run_id]
        for criterion in (*(c.strip() for c in config.criteria), "overall"):
            values = [sum(s.values()) / len(s) if criterion == "overall" else s[criterion] for s in mine]
            means.append(CriterionMean(run_id, criterion, stats.summarize(values)))
    overall = {key: sum(s.values()) / len(s) for key, s in scores.items()}
    verdicts = {
        p: v for p in questions if (v := rubric_verdict(overall.get((p, run_a)), overall.get((p, run_b)))) is not None
    }
    return JudgeResult(
        stamp,
        config,
        run_a,
        run_b,
        len(questions),
        len(rows),
        sum(r["scores"] is None for r in rows),
        verdicts,
        means=tuple(means),
        humans=_human_agreement(store, run_a, run_b, verdicts),
    )


def results(store: Store, run_x: int, run_y: int) -> list[JudgeResult]:
    """Every judge's result on these two runs, oldest judge first."""
    return [judge_result(store, config, run_x, run_y) for config in judges_of(store, run_x, run_y)]


def results_table(store: Store, run_ids: Sequence[int]) -> pd.DataFrame:
    """One row per judge and pair of these runs: its verdicts beside the humans' on the same pair, and how far
    it agrees with them (what the Compare page, the report and `compare` show)."""
    rows = []
    for run_x, run_y in itertools.combinations(sorted(set(run_ids)), 2):
        humans = ratings.win_rates(store, run_x, run_y)
        for result in results(store, run_x, run_y):
            w, agreement = result.win_rates, result.humans.agreement
            rows.append(
                {
                    "runs": f"{run_x} vs {run_y}",
                    "judge": describe(result.config),
                    "replies": result.replies,
                    "unparseable": result.unparseable,
                    "verdicts": len(result.verdicts),
                    "position bias": result.position_bias if result.config.mode == "pairwise" else None,
                    "judge: first run wins": w.win_rate_x if w and w.n else None,
                    "judge 95% CI": _interval(w) if w and w.n else "",
                    "humans: first run wins": humans.win_rate_x if humans.n else None,
                    "humans 95% CI": _interval(humans) if humans.n else "",
                    "human verdicts": humans.n,
                    "agreement": agreement.equal_share if agreement else None,
                    "kappa": agreement.kappa if agreement else None,
                    "kappa 95% CI": f"{agreement.ci_low:.2f} to {agreement.ci_high:.2f}" if agreement else "",
                    "with the humans": result.humans.describe(),
                }
            )
    return pd.DataFrame(rows)


def _interval(w: ratings.WinRates) -> str:
    return f"{w.ci_low:.2f} to {w.ci_high:.2f} (n={w.n})"
