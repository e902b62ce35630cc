"""Settings: the workspace, the embedded models and their state, the Ollama host and model overrides."""

import pandas as pd
import streamlit as st

from core import jobs, models, settings, workspace
from core.backends import server_urls
from core.errors import WorkbenchError
from workbench import forms, ui

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
hosts = server_urls(current.effective_ollama_host)
st.caption(f"Server{'s' if len(hosts) > 1 else ''} in use: {ui.plain(', '.join(hosts))}")


@st.fragment
def ollama_check() -> None:
    """Asks each server on every visit (a refused connection answers at once); a button asks again."""
    from core.backends.ollama import OllamaBackend

    st.button("Check again", icon=":material/refresh:")
    for host in hosts:
        try:
            with OllamaBackend("", host=host, timeout=3.0) as backend:
                version, names = backend.version(), backend.models()
        except WorkbenchError as exc:
            st.warning(f"{ui.plain(exc)} The embedded llama.cpp backend works without it.", icon=":material/cloud_off:")
            continue
        # the version is whatever the server says: shown as text, never as Markdown
        st.success(
            f"Ollama {ui.plain(version)} at {ui.plain(host)} is reachable with {len(names)} model(s).",
            icon=":material/cloud_done:",
        )
        if names:
            st.dataframe(pd.DataFrame({"model": names}), hide_index=True)


ollama_check()

st.subheader("Models and server")
with st.form("settings"):
    values = forms.config_form(
        settings.WorkbenchSettings,
        key="settings",
        defaults=current,
        labels={
            "ollama_host": "Ollama host",
            "ollama_parallel": "Parallel Ollama requests",
            "openai_base_url": "OpenAI-compatible server URL",
            "openai_server": "It is served by",
            "openai_parallel": "Parallel requests to it",
            "llamacpp_parallel": "Parallel llama.cpp sequences",
            "generator_model": "Generator model (transformers, training)",
            "generator_gguf": "Generator GGUF (llama.cpp)",
            "scorer_model": "BERTScore model",
            "optuna_storage": "Optuna storage",
        },
        widgets={
            "ollama_host": {"placeholder": settings.DEFAULT_OLLAMA_HOST},
            "openai_base_url": {"placeholder": "http://gpu-box:8000/v1 (vLLM, llama-server, TGI, LM Studio)"},
            "generator_model": {"placeholder": "embedded Gemma 3 270M checkpoint"},
            "generator_gguf": {"placeholder": "embedded Gemma 3 270M GGUF"},
            "scorer_model": {"placeholder": "embedded all-MiniLM-L6-v2"},
            "optuna_storage": {"placeholder": "the workspace's SQLite file"},
        },
    )
    if st.form_submit_button("Save settings", icon=":material/save:"):
        saved = ui.attempt(lambda: settings.save(store, settings.WorkbenchSettings.from_dict(values)), "settings saved")
        if saved:
            st.rerun()
