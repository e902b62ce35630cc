"""The comparison report: one offline HTML file that renders in a real browser, escapes model text,
and is refused (exit 2, nothing written) for runs that cannot be compared."""

from __future__ import annotations

import re
from html import escape

import pytest

from core import dataset, runs, scoring
from core.store import now
from tests.conftest import run_cli
from workbench import figures

SCRIPT_ANSWER = '<script>alert("pwned")</script> and <b>bold</b>'


def _scored_run(
    store, label: str, f1s: list[float], stamp: str, answers: dict[int, str] | None = None, **spec_fields
) -> int:
    """A run of the echo backend over the first len(f1s) starter questions, with the given scores stored."""
    spec = runs.RunSpec(
        dataset="starter", backend="echo", part="all", limit=len(f1s), label=label, scorer=stamp, **spec_fields
    )
    run_id = runs.create_run(store, spec)
    pairs = runs.run_pairs(store, runs.get_run(store, run_id))
    with store.transaction() as conn:
        for i, (pair, f1) in enumerate(zip(pairs, f1s)):
            answer = (answers or {}).get(i, f"{label} answer {i}")
            gen_id = conn.execute(
                "INSERT INTO generations (run_id, pair_id, answer, created_at) VALUES (?, ?, ?, ?)",
                (run_id, pair.id, answer, now()),
            ).lastrowid
            conn.execute(
                "INSERT INTO scores (generation_id, scorer, precision, recall, f1, rouge_l, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (gen_id, stamp, f1 + 0.02, f1 - 0.02, f1, f1 / 2, now()),
            )
    return run_id


@pytest.fixture
def two_runs(store) -> tuple[int, int]:
    """Base scores around 0.4, tuned around 0.84; question 0 differs most and its tuned answer holds a script."""
    stamp = scoring.scorer_stamp(scoring.ScorerConfig())
    base = [0.30 + 0.01 * (i % 15) for i in range(20)]
    tuned = [0.80 + 0.004 * (i % 15) for i in range(20)]
    base[0], tuned[0] = 0.05, 0.99
    a = _scored_run(store, "base", base, stamp)
    b = _scored_run(store, "tuned", tuned, stamp, answers={0: SCRIPT_ANSWER})
    return a, b


@pytest.mark.browser
@pytest.mark.slow
def test_compare_report_opens_offline_in_a_browser(two_runs, tmp_path, browser):
    a, b = two_runs
    out = tmp_path / "report.html"
    result = run_cli("compare", str(a), str(b), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert list(tmp_path.glob("*.html")) == [out]
    html = out.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc=", html)  # plotly.js inline: nothing loaded from outside

    page = browser.new_page(viewport={"width": 1300, "height": 900})
    try:
        page.goto(out.resolve().as_uri())
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 2")
        assert page.locator(".js-plotly-plot").count() >= 2
        drawn = page.locator(".js-plotly-plot").first.text_content()  # subplot titles drawn in the SVG
        assert f"run {a} (base)" in drawn and f"run {b} (tuned)" in drawn
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
    finally:
        page.close()
    assert shot.stat().st_size > 20_000


def test_report_escapes_model_text_and_exports_csv(two_runs, tmp_path):
    a, b = two_runs
    out, folder = tmp_path / "report.html", tmp_path / "tables"
    result = run_cli("compare", str(a), str(b), "-o", str(out), "--metric", "rouge_l", "--csv", str(folder))
    assert result.returncode == 0, result.stderr
    html = out.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in html
    assert "<script>alert" not in html and "<b>bold</b>" not in html
    assert sorted(p.name for p in folder.iterdir()) == ["per_question.csv", "summary.csv"]


def test_a_run_chosen_on_the_questions_it_is_compared_on_is_marked_in_the_report_and_the_cli(store, tmp_path):
    stamp = scoring.scorer_stamp(scoring.ScorerConfig())
    asked = [p.id for p in dataset.select_pairs(store, "starter")][:5]
    selection = {"how": "best of 3 <b>prompts</b>", "candidates": 3, "split_id": None, "part": "all", "pair_ids": asked}
    base = _scored_run(store, "base", [0.4] * 5, stamp)
    chosen = _scored_run(store, "chosen", [0.6] * 5, stamp, selection=selection)
    out = tmp_path / "report.html"
    result = run_cli("compare", str(base), str(chosen), "-o", str(out))
    assert result.returncode == 0, result.stderr
    note = f"run {chosen}: best of 3 <b>prompts</b>, chosen on 5 of the 5 questions it is scored on: optimistic"
    assert result.stderr.strip().splitlines() == [f"warning: {note}"]
    html = out.read_text(encoding="utf-8")
    assert f'<p class="note">{escape(note)}</p>' in html and "<b>prompts" not in html


@pytest.mark.parametrize("case", ["incomparable", "unknown run", "one run"])
def test_bad_input_exits_2_and_writes_nothing(two_runs, store, tmp_path, case):
    a, b = two_runs
    if case == "incomparable":  # scored with another scorer setting: numbers that must not be mixed
        stamp = scoring.scorer_stamp(scoring.ScorerConfig(rescale=True))
        ids = [a, _scored_run(store, "other scorer", [0.5] * 20, stamp)]
    else:
        ids = {"unknown run": [a, 999], "one run": [a]}[case]
    out = tmp_path / "report.html"
    result = run_cli("compare", *map(str, ids), "-o", str(out), "--csv", str(tmp_path / "tables"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "tables").exists()


@pytest.mark.parametrize("mode", ["histogram", "density", "ecdf"])
def test_overlaid_histograms_share_bins_across_runs(mode):
    fig = figures.overlaid_histograms({"a": [0.1, 0.4, float("nan")], "b": [0.5, 0.9]}, "F1", mode=mode)
    assert [t.name for t in fig.data] == ["a", "b"]
    if mode != "ecdf":
        assert fig.data[0].xbins == fig.data[1].xbins and fig.layout.barmode == "overlay"


@pytest.mark.parametrize("kind", ["box", "violin"])
def test_score_boxes_draw_one_trace_per_run(kind):
    fig = figures.score_boxes({"a": [0.1, 0.4], "b": [0.5, 0.9]}, "F1", kind=kind)
    assert [(t.type, t.name) for t in fig.data] == [(kind, "a"), (kind, "b")]
