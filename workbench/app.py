"""Entry point of the Streamlit app: `streamlit run workbench/app.py` (or `make run`).

Builds the navigation; each page lives in pages/ and runs inside an error guard.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core import models
from workbench import ui

PAGES_DIR = Path(__file__).resolve().parent.parent / "pages"

st.set_page_config(page_title="QA Tuning Workbench", page_icon=":material/science:", layout="wide")

navigation = st.navigation(
    {
        "Workbench": [
            st.Page(PAGES_DIR / "overview.py", title="Overview", icon=":material/home:", default=True),
            st.Page(PAGES_DIR / "dataset.py", title="Dataset", icon=":material/table_view:"),
            st.Page(PAGES_DIR / "playground.py", title="Playground", icon=":material/tune:"),
            st.Page(PAGES_DIR / "sweep.py", title="Sweep", icon=":material/grid_view:"),
            st.Page(PAGES_DIR / "training.py", title="Training", icon=":material/model_training:"),
            st.Page(PAGES_DIR / "compare.py", title="Compare", icon=":material/compare_arrows:"),
        ],
        "System": [
            st.Page(PAGES_DIR / "jobs.py", title="Jobs", icon=":material/pending_actions:"),
            st.Page(PAGES_DIR / "settings.py", title="Settings", icon=":material/settings:"),
        ],
    }
)

if not all(state.ready for state in models.model_states()):
    st.warning(
        "The embedded models are not all prepared yet: what needs one prepares it first (about a minute, once). "
        "Prepare them now on the Settings page or with `python -m workbench prepare-models`.",
        icon=":material/warning:",
    )
ui.run_page(navigation)
