"""Sweep: run a grid (or an Optuna search) of decoding parameters over a dataset split and compare.

Every configuration becomes a scored run. Results show a histogram of F1 per configuration
(same bins and axes), mean F1 with its 95% confidence interval against each parameter, and a
table with the best configuration marked (chosen on the validation questions); selecting a row
lists its answers. "Confirm the best on test" runs the best once on the test part, to report.
"""

import streamlit as st

from core import scoring, sweep
from core.backends import USER_BACKENDS
from core.config import spec
from core.decoding import DecodingParams
from workbench import figures, forms, ui

NUMBER_COLUMNS = ("mean_f1", "validation_f1", "test_f1", "ci_low", "ci_high", "median_f1", "std_f1", "rouge_l")

st.title("Sweep")
store = ui.store()
name = ui.dataset_picker()
if name is None:
    st.stop()

with st.expander("New sweep", expanded=not sweep.list_sweeps(store, name)):
    with st.form("sweep"):
        values = forms.config_form(
            sweep.SweepConfig,
            key="sweep",
            only=("backend", "model", "part", "mode"),
            labels={"part": "Questions"},
            widgets={
                "backend": {"options": USER_BACKENDS},  # the echo backend is for tests
                "model": {"placeholder": "Settings' generator, else embedded"},
            },
            columns=4,
        )
        st.markdown(
            "**Grid** — comma-separated values per parameter; leave a parameter empty to keep it at the baseline value."
        )
        grid_cols = st.columns(len(sweep.SWEEPABLE))
        defaults = {"temperature": "0, 0.7", "top_p": "0.7"}
        grid_text = {
            p: col.text_input(p, defaults.get(p, ""), help=spec(DecodingParams, p).help, key=f"sweep-grid-{p}")
            for col, p in zip(grid_cols, sweep.SWEEPABLE)
        }
        with st.popover("Baseline values"):
            values["baseline"] = ui.attempt(lambda: ui.decoding_sliders("sweep-base"))
        values |= forms.config_form(
            sweep.SweepConfig,
            key="sweep",
            only=("limit", "repeats", "trials", "scorer_model", "rescale"),
            labels={
                "limit": "Questions (empty = all)",
                "trials": "Optuna trials",
                "scorer_model": "BERTScore model",
                "rescale": "Rescale F1",
            },
            widgets={"scorer_model": {"placeholder": "Settings' scorer, else MiniLM"}},
            columns=5,
        )
        values |= forms.config_form(
            sweep.SweepConfig, key="sweep", only=("prompt_template",), widgets={"prompt_template": {"height": 80}}
        )
        go = st.form_submit_button("Start sweep", type="primary", icon=":material/play_arrow:")
    if go and values["baseline"]:

        def start():
            grid = sweep.parse_grid(" ".join(f"{p}={v.replace(' ', '')}" for p, v in grid_text.items() if v.strip()))
            config = sweep.SweepConfig.from_dict({"dataset": name, "grid": grid, **values})
            return sweep.start_sweep(store, config)

        if started := ui.attempt(start, "sweep started"):
            st.session_state["sweep_id"] = started[0]

sweeps = sweep.list_sweeps(store, name)
if not sweeps:
    st.info("No sweep on this dataset yet: start one above.")
    st.stop()


def describe(s: sweep.Sweep) -> str:
    grid = " ".join(f"{k}={','.join(str(v) for v in vs)}" for k, vs in s.config.grid.items())
    what = f"best of sweep {s.config.confirms} on test" if s.config.confirms is not None else s.config.mode
    return f"sweep {s.id} · {s.config.backend} · {what} · {s.config.part} · {grid}"


ids = [s.id for s in sweeps]
wanted = st.session_state.get("sweep_id")
chosen_id = st.selectbox(
    "Sweep",
    ids,
    index=ids.index(wanted) if wanted in ids else 0,
    format_func=lambda i: describe(next(s for s in sweeps if s.id == i)),
)
chosen = sweep.get_sweep(store, chosen_id)
if chosen.config.confirms is not None:
    st.caption(
        f"This sweep runs the best configuration of sweep {chosen.config.confirms} once on the test part of"
        " the split that sweep was made on: its score is the one to report."
    )
if chosen.job_id:
    ui.job_panel(chosen.job_id, log_lines=4)
if chosen.config.confirms is None:  # a confirmation is made from its sweep, never started again by itself
    again = st.button("Run this sweep again", icon=":material/replay:", help="A new sweep with the same settings")
    if again and (started := ui.attempt(lambda: sweep.start_sweep(store, chosen.config), "sweep started again")):
        st.session_state["sweep_id"] = started[0]
        st.rerun()


@st.fragment(run_every=5.0)
def results() -> None:
    table = sweep.sweep_table(store, chosen.id)
    if table.empty or not table["n"].any():
        st.caption("No scored answers yet.")
        return
    varied = [p for p in sweep.SWEEPABLE if table[p].nunique(dropna=True) > 1]
    filters = {}
    if varied:
        cols = st.columns(len(varied))
        for col, p in zip(cols, varied):
            values = sorted(table[p].dropna().unique().tolist())
            filters[p] = col.multiselect(f"Show {p}", values, default=values, key=f"filter-{chosen.id}-{p}")
    for p, values in filters.items():
        table = table[table[p].isin(values)]
    labels = {
        int(r["run"]): ("★ " if r["best"] else "") + (" ".join(f"{p}={r[p]}" for p in varied) or f"run {int(r['run'])}")
        for _, r in table.iterrows()
    }
    stamp = scoring.scorer_stamp(chosen.config.scorer)
    scores = {labels[run]: scoring.run_scores(store, run, stamp)["f1"].tolist() for run in labels}
    st.plotly_chart(figures.score_histograms(scores, "BERTScore F1"), width="stretch")
    for p in varied:
        others = [o for o in varied if o != p]
        st.plotly_chart(figures.mean_with_ci(table, p, others), width="stretch")
    numbers = [c for c in NUMBER_COLUMNS if c in table]
    # In run order, so a selected row stays the same configuration while scores arrive (click a header to sort).
    shown = table.sort_values("run")[["best", "run", *varied, "n", *numbers]].reset_index(drop=True)

    if chosen.config.confirms is None:
        st.caption(ui.plain(sweep.choose(store, chosen.id).describe()))
    if (made := sweep.confirmation(store, chosen.id)) is not None:  # here, so that it refreshes with the table
        test = scoring.run_scores(store, made[0], stamp)["f1"].dropna()
        score = f"mean F1 {test.mean():.4f} on {len(test)} test answers" if len(test) else "not scored yet"
        st.caption(f"The best on test (run {made[0]}): {score}.")
    st.caption("Select a configuration to read its answers next to the references.")
    selected = ui.pick_row(
        shown,
        f"sweep-table-{chosen.id}",
        {
            "best": st.column_config.CheckboxColumn("best"),
            "run": st.column_config.NumberColumn(format="%d"),
            **{c: st.column_config.NumberColumn(format="%.4f") for c in numbers},
        },
    )
    if selected is not None:
        run_id = int(shown.iloc[selected]["run"])
        answers = scoring.run_scores(store, run_id, stamp)
        st.subheader(f"Answers of run {run_id}")
        st.dataframe(
            answers[["question", "reference", "answer", "f1", "rouge_l", "repeat"]],
            hide_index=True,
            width="stretch",
            column_config={
                "f1": st.column_config.NumberColumn(format="%.3f"),
                "rouge_l": st.column_config.NumberColumn(format="%.3f"),
            },
        )


results()


def confirm_on_test() -> None:
    """The button that runs the best once on test; once pressed, that run's job."""
    made = sweep.confirmation(store, chosen.id)
    if made is not None:
        st.subheader(f"Confirmed on test: run {made[0]}")
        ui.job_panel(made[1], log_lines=2)
    elif st.button(
        "Confirm the best on test",
        icon=":material/verified:",
        help="Run the best configuration, chosen on the validation questions, once on the test part of the"
        " same split: a new scored run, the number to report and to compare",
    ) and ui.attempt(lambda: sweep.confirm_best(store, chosen.id), "confirmation on test started"):
        st.rerun()


# Only a best chosen on validation questions can be confirmed: one chosen on test is already scored there.
if chosen.config.confirms is None and sweep.choose(store, chosen.id).part == "validation":
    confirm_on_test()
