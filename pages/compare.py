"""Compare: BERTScore distributions of chosen runs side by side, honest statistics, drill-down,
blind human rating and a shareable report.
"""

from pathlib import Path

import pandas as pd
import streamlit as st

from core import compare, judge, judging, ratings, runs, sweep
from core.errors import WorkbenchError
from core.judge import JudgeConfig
from workbench import figures, forms, ui

st.title("Compare")
store = ui.store()
summaries = runs.list_runs(store)
if not summaries:
    st.info("No runs yet: sweep decoding parameters on the Sweep page (or fine-tune) to get runs to compare.")
    st.stop()
by_id = {s.run.id: s for s in summaries}


WEAK_JUDGE_NOTE = (
    "The embedded Gemma 270M is no judge: on 23 pairs of the starter test split rated blind by hand it answered"
    ' "Answer 1" every time (position bias 100%, no pairwise verdict) and scored every answer 1/5 on the rubric'
    " (Cohen's kappa 0.00 with the human ratings). For verdicts to rely on, judge with a bigger model through"
    " Ollama, and check its agreement here."
)


def label(run_id: int) -> str:
    s = by_id[run_id]
    r = s.run
    f1 = f" · F1 {s.mean_f1:.3f}" if s.mean_f1 is not None else ""
    adapter = f" · adapter {Path(r.adapter).name}" if r.adapter else ""
    return f"run {r.id} · {r.kind} · {r.backend}{adapter} · {runs.describe_params(r.params)}{f1}"


with st.container(border=True):
    f1c, f2c, f3c = st.columns(3)
    datasets = sorted({s.run.dataset for s in summaries})
    ds_filter = f1c.multiselect("Dataset", datasets, placeholder="all datasets")
    backends = sorted({s.run.backend for s in summaries})
    be_filter = f2c.multiselect("Backend", backends, placeholder="all backends")
    kinds = sorted({s.run.kind for s in summaries})
    kind_filter = f3c.multiselect("Kind", kinds, placeholder="all kinds")
    text = st.text_input("Filter by model, adapter, split or parameters", placeholder="e.g. temperature=0.7")

    def matches(s: runs.RunSummary) -> bool:
        r = s.run
        haystack = f"{label(r.id)} {r.model} {r.adapter} {r.part} split v{r.split_version}".lower()
        return all(word in haystack for word in text.lower().split())

    candidates = [
        s.run.id
        for s in reversed(summaries)
        if (not ds_filter or s.run.dataset in ds_filter)
        and (not be_filter or s.run.backend in be_filter)
        and (not kind_filter or s.run.kind in kind_filter)
        and s.n_scored
        and matches(s)
    ]

    if st.button(
        "Baseline vs best decoding vs fine-tuned",
        icon=":material/auto_awesome:",
        help="The most recent default-parameter run, the best decoding configuration (chosen on validation, its"
        " run on test) and the latest fine-tuned run, on the test part where such runs exist",
    ):
        preset = compare.preset_runs(store)
        st.session_state["compare_runs"] = [i for i in preset.run_ids if i in candidates]
        st.session_state["preset_note"] = (preset.note, preset.to_confirm)
    note, to_confirm = st.session_state.get("preset_note", ("", None))
    if note:
        st.info(ui.plain(note), icon=":material/info:")
    confirm = to_confirm is not None and st.button("Confirm the best on test", icon=":material/verified:")
    if confirm and (made := ui.attempt(lambda: sweep.confirm_best(store, to_confirm))):
        st.session_state["preset_note"] = (
            f"sweep {to_confirm}'s best runs on test as run {made[0]} (job {made[1]}): press the preset again"
            " once it is scored",
            None,
        )
        st.rerun()
    if "compare_runs" not in st.session_state:  # first visit: the runs in the URL, else the two newest
        from_url = [int(i) for i in st.query_params.get("runs", "").split(",") if i.isdigit()]
        st.session_state["compare_runs"] = [i for i in from_url if i in candidates] or candidates[:2]
    st.session_state["compare_runs"] = [i for i in st.session_state["compare_runs"] if i in candidates]
    chosen = st.multiselect("Runs", candidates, format_func=label, key="compare_runs")
    st.query_params["runs"] = ",".join(map(str, chosen))  # a reload or a shared link shows the same runs


if len(chosen) < 1:
    st.info("Pick at least one scored run.")
    st.stop()

metric = st.segmented_control("Metric", list(compare.METRICS), format_func=compare.METRICS.get, default="f1") or "f1"
comparable = True
if len(chosen) > 1:
    try:
        compare.check_comparable(store, chosen)
    except WorkbenchError as exc:
        comparable = False
        st.warning(f"These runs are not comparable: {ui.plain(exc)}", icon=":material/block:")

for selection_note in compare.selection_notes(store, chosen):
    st.warning(ui.plain(selection_note), icon=":material/warning:")

per_question = compare.per_question(store, chosen, metric)
names = {i: f"run {i}" for i in chosen}

scores = {names[i]: per_question[i].dropna().tolist() for i in chosen}

tabs = st.tabs(["Distributions", "Summary", "What differs", "Answers", "Blind rating", "Judge", "Report"])
with tabs[0]:
    view = st.segmented_control("View", ["side by side", "overlaid", "box", "violin"], default="side by side")
    if view == "overlaid":
        mode = st.radio("As", ["histogram", "density", "ecdf"], horizontal=True)
        st.plotly_chart(figures.overlaid_histograms(scores, compare.METRICS[metric], mode=mode), width="stretch")
    elif view in ("box", "violin"):
        st.plotly_chart(figures.score_boxes(scores, compare.METRICS[metric], kind=view), width="stretch")
    else:
        st.plotly_chart(figures.score_histograms(scores, compare.METRICS[metric]), width="stretch")

with tabs[1]:
    if comparable:
        c1, c2 = st.columns(2)
        baseline = c1.selectbox("Baseline run", chosen, format_func=lambda i: names[i])
        threshold = c2.slider("Share of answers at or above", 0.0, 1.0, 0.5, 0.05)
        table = compare.summary_table(store, chosen, metric, baseline_run=baseline, threshold=threshold)
        st.dataframe(table, hide_index=True, width="stretch")
        st.caption(
            "CI: 95% bootstrap interval of the mean. Differences are paired, on the questions both runs "
            "answered (baseline subtracted); p from a Wilcoxon signed-rank test; effect size d_z."
        )
    else:
        st.caption("No statistics across runs that are not comparable.")

with tabs[2]:
    diff = compare.config_diff(store, chosen)
    if diff.shape[1] <= 1:
        st.caption("The chosen runs have the same settings.")
    st.dataframe(diff, hide_index=True, width="stretch")

with tabs[3]:
    frame = per_question.copy()
    frame["spread"] = frame[chosen].max(axis=1) - frame[chosen].min(axis=1)
    frame = frame.sort_values("spread", ascending=False).reset_index(drop=True)
    shown = frame[["question", *chosen, "spread"]].rename(columns=names)
    selected = ui.pick_row(
        shown,
        "compare-questions",
        {n: st.column_config.NumberColumn(format="%.3f") for n in [*names.values(), "spread"]},
    )
    if selected is not None:
        row = frame.iloc[selected]
        st.markdown("**Question**")
        st.text(row["question"])
        cols = st.columns(len(chosen) + 1)
        with cols[0]:
            st.markdown("**Reference**")
            st.text(row["reference"])
        for col, run_id in zip(cols[1:], chosen):
            with col:
                st.markdown(f"**{names[run_id]}** · {compare.METRICS[metric]} {row[run_id]:.3f}")
                st.text(row.get(f"answer_{run_id}", ""))

with tabs[4]:
    st.markdown("Two answers to the same question, in random order and unlabelled: which is better?")
    r1, r2, r3 = st.columns(3)
    rater = r1.text_input("Your name", key="rater")
    run_x = r2.selectbox("Run", chosen, format_func=lambda i: names[i], key="rate-x")
    run_y = r3.selectbox(
        "against", [i for i in chosen if i != run_x] or chosen, format_func=lambda i: names[i], key="rate-y"
    )
    if not rater.strip():
        st.caption("Enter your name to start; you can stop at any time and continue later.")
    elif run_x == run_y:
        st.caption("Pick two different runs.")
    else:
        item = ratings.next_item(store, rater.strip(), run_x, run_y)
        if item is None:
            st.success("You have rated every question these two runs share.", icon=":material/task_alt:")
        else:
            st.caption(f"{item.remaining} left to rate")
            st.markdown("**Question**")
            st.text(item.question)
            left, right = st.columns(2)
            with left, st.container(border=True):
                st.markdown("**Answer 1**")
                st.text(item.left_answer)
            with right, st.container(border=True):
                st.markdown("**Answer 2**")
                st.text(item.right_answer)
            b1, b2, b3, _ = st.columns([1, 1, 1, 2])
            for col, text, choice, key in (
                (b1, "Answer 1 is better", "left", "1"),
                (b2, "Tie", "tie", "t"),
                (b3, "Answer 2 is better", "right", "2"),
            ):
                if col.button(text, key=f"rate-{choice}", shortcut=key):
                    # The verdict is about the answers that were on screen, even if the queue moved since.
                    shown = st.session_state.get("rating_shown", item)
                    if {shown.left_run, shown.right_run} != {run_x, run_y}:
                        shown = item
                    ui.attempt(lambda choice=choice, shown=shown: ratings.record(store, rater.strip(), shown, choice))
                    st.rerun()
            st.session_state["rating_shown"] = item

        result = ratings.win_rates(store, run_x, run_y)
        if result.n:
            st.dataframe(pd.DataFrame([result.__dict__]), hide_index=True, width="stretch")
            agreement = ratings.agreement(store, run_x, run_y)
            if agreement:
                st.caption(f"Agreement between raters: {agreement}")

with tabs[5]:
    st.markdown(
        "An LLM judge reads the question, the reference and two answers and says which is better (asked in both"
        " orders: a verdict counts only when both agree), or scores each answer 1–5 per criterion. Its agreement"
        " with the blind human ratings of the same pairs is shown beside every result."
    )
    st.caption(WEAK_JUDGE_NOTE)
    j1, j2 = st.columns(2)
    judge_x = j1.selectbox("Run", chosen, format_func=lambda i: names[i], key="judge-x")
    judge_y = j2.selectbox(
        "against", [i for i in chosen if i != judge_x] or chosen, format_func=lambda i: names[i], key="judge-y"
    )
    if judge_x == judge_y:
        st.caption("Pick two different runs.")
    else:
        with st.form("judge"):
            values = forms.config_form(
                JudgeConfig,
                key="judge",
                only=("backend", "model", "mode", "max_tokens"),
                widgets={"model": {"placeholder": "the embedded Gemma 270M"}},
                columns=4,
            )
            values |= forms.config_form(JudgeConfig, key="judge", only=("criteria",))
            submitted = st.form_submit_button("Run the judge", icon=":material/gavel:")
        if submitted:
            job_id = ui.attempt(lambda: judging.start_judging(store, JudgeConfig.from_dict(values), judge_x, judge_y))
            if job_id:
                st.session_state["judge_job"] = job_id
        if st.session_state.get("judge_job"):
            ui.job_panel(st.session_state["judge_job"], log_lines=4)
        judged = judging.results_table(store, [judge_x, judge_y])
        if judged.empty:
            st.caption("No judge has judged these two runs yet.")
        else:
            share = st.column_config.NumberColumn(format="percent")
            st.dataframe(
                judged,
                hide_index=True,
                width="stretch",
                column_config={
                    name: share
                    for name in ("position bias", "judge: first run wins", "humans: first run wins", "agreement")
                }
                | {"kappa": st.column_config.NumberColumn(format="%.2f")},
            )
            humans = ratings.win_rates(store, min(judge_x, judge_y), max(judge_x, judge_y))
            rated = judging.win_rate_text(humans) if humans.n else "no blind ratings of these runs yet"
            st.markdown(f"**Humans** — {rated}")
            for result in judging.results(store, judge_x, judge_y):
                st.markdown(f"**{ui.plain(judge.describe(result.config))}** — {ui.plain(result.headline())}")
            st.caption(
                f"Win rates are run {min(judge_x, judge_y)}'s over run {max(judge_x, judge_y)} (a tie counts half),"
                " 95% Wilson intervals; agreement and Cohen's kappa (95% bootstrap interval) on the human verdicts"
                " the judge has a verdict beside; position bias: pairs whose verdict flipped with the order."
            )

with tabs[6]:
    if comparable and len(chosen) > 1:
        from workbench import comparison

        if st.button("Build the report", icon=":material/description:"):
            html = ui.attempt(lambda: comparison.build_report(store, chosen, metric))
            if html:
                st.download_button(
                    "Download report.html",
                    html.encode(),
                    file_name="compare-report.html",
                    mime="text/html",
                    icon=":material/download:",
                    on_click="ignore",  # no rerun: the other downloads stay on the page
                )
            tables = ui.attempt(lambda: comparison.tables_csv(store, chosen, metric))
            for name, data in (tables or {}).items():
                st.download_button(
                    f"Download {name}", data, file_name=name, mime="text/csv", key=f"csv-{name}", on_click="ignore"
                )
    else:
        st.caption("A report compares two or more comparable runs.")
