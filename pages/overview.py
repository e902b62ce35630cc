"""Overview: where the workspace stands — datasets, runs, jobs — and the loop the workbench serves."""

from pathlib import Path

import pandas as pd
import streamlit as st

from core import dataset, runs, workspace
from workbench import ui

st.title("QA Tuning Workbench")
st.caption(f"Workspace: {workspace.home()}")
st.markdown(
    "Make an open LLM answer research-method questions well: **curate** question–answer pairs, "
    "**sweep** decoding parameters, **fine-tune** with QLoRA, and **compare** BERTScore distributions."
)

store = ui.store()
left, right = st.columns(2)
with left:
    st.subheader("Datasets")
    st.dataframe(pd.DataFrame(dataset.overview(store)), hide_index=True, width="stretch")
with right:
    st.subheader("Jobs")
    frame = ui.jobs_frame(limit=8)
    if frame.empty:
        st.caption("No background jobs yet.")
    else:
        st.dataframe(
            frame[["id", "kind", "state", "progress", "message"]],
            hide_index=True,
            width="stretch",
            column_config=ui.JOB_COLUMNS,
        )

st.subheader("Runs")
summaries = runs.list_runs(store)
if not summaries:
    st.caption("No runs yet. A run is one backend + model + decoding parameters applied to a dataset split.")
else:
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "id": s.run.id,
                    "kind": s.run.kind,
                    "backend": s.run.backend,
                    "model": Path(s.run.model).name or s.run.model,
                    "answers": s.n_answers,
                    "mean F1": s.mean_f1,
                    "median F1": s.median_f1,
                    "params": runs.describe_params(s.run.params),
                }
                for s in reversed(summaries)
            ]
        ),
        column_config={
            "mean F1": st.column_config.NumberColumn(format="%.4f"),
            "median F1": st.column_config.NumberColumn(format="%.4f"),
        },
        hide_index=True,
        width="stretch",
    )
