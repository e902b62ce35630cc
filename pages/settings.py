"""Settings: the workspace, the embedded models and their state, the Ollama host and model overrides."""

from dataclasses import fields, replace

import pandas as pd
import streamlit as st

from core import jobs, models, settings, workspace
from core.errors import WorkbenchError
from workbench import ui

st.title("Settings")
store = ui.store()
current = settings.load(store)

st.subheader("Workspace")
db = workspace.db_path()
st.text(f"{workspace.home()}\nstore: {db.name} ({db.stat().st_size / 1e6:.1f} MB)\nmodels: {workspace.models_dir()}")

st.subheader("Embedded models")
states = models.model_states()
st.dataframe(
    pd.DataFrame(
        [{"model": s.name, "role": s.role, "ready": s.ready, "detail": s.detail, "path": str(s.path)} for s in states]
    ),
    hide_index=True,
    width="stretch",
)
st.caption(ui.plain(ui.engine_summary()))
if not all(s.ready for s in states):
    if st.button("Prepare the embedded models", icon=":material/download_for_offline:"):
        job_id = ui.attempt(lambda: jobs.submit(store, "prepare-models", {}))
        if job_id:
            st.session_state["prepare_job"] = job_id
    if "prepare_job" in st.session_state:
        ui.job_panel(st.session_state["prepare_job"])

st.subheader("Ollama")
host = current.effective_ollama_host
st.caption(f"Server in use: {ui.plain(host)}")


@st.fragment
def ollama_check() -> None:
    """Asks the server on every visit (a refused connection answers at once); a button asks again."""
    from core.backends.ollama import OllamaBackend

    st.button("Check again", icon=":material/refresh:")
    try:
        with OllamaBackend("", host=host, timeout=3.0) as backend:
            version, names = backend.version(), backend.models()
    except WorkbenchError as exc:
        st.warning(f"{ui.plain(exc)} The embedded llama.cpp backend works without it.", icon=":material/cloud_off:")
        return
    # the version is whatever the server says: shown as text, never as Markdown
    st.success(f"Ollama {ui.plain(version)} is reachable with {len(names)} model(s).", icon=":material/cloud_done:")
    if names:
        st.dataframe(pd.DataFrame({"model": names}), hide_index=True)


ollama_check()

st.subheader("Models and server")
with st.form("settings"):
    values = {}
    for f in fields(settings.WorkbenchSettings):
        value = getattr(current, f.name)
        label = f.name.replace("_", " ").capitalize()
        if isinstance(value, int):
            values[f.name] = st.number_input(label, min_value=1, max_value=64, value=value, help=f.metadata["help"])
        else:
            values[f.name] = st.text_input(label, value=value, help=f.metadata["help"])
    if st.form_submit_button("Save settings", icon=":material/save:"):
        saved = ui.attempt(lambda: settings.save(store, replace(current, **values)), "settings saved")
        if saved:
            st.rerun()
