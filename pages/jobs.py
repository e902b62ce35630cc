"""Jobs: every background job (from the pages or the CLI), live, with cancel, resume and log tail."""

import streamlit as st

from workbench import ui

st.title("Jobs")
st.caption(
    "Long work runs in its own process; it survives browser reloads and app restarts. "
    "A job whose process died shows as interrupted and can be resumed where it stopped."
)


@st.fragment(run_every=2.0)
def table() -> None:
    frame = ui.jobs_frame()
    if frame.empty:
        st.info("No jobs yet. Jobs appear here when you generate, sweep, train or prepare models.")
        return
    st.dataframe(frame, hide_index=True, width="stretch", column_config=ui.JOB_COLUMNS)


table()
ids = ui.jobs_frame()["id"].tolist()
if ids:
    chosen = st.selectbox("Job details", ids, format_func=lambda i: f"job {i}")
    ui.job_panel(int(chosen))
