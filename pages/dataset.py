"""Dataset: browse a dataset's pairs, import a file, draw a frozen train/test split, export."""

import tempfile
from pathlib import Path

import streamlit as st

from core import dataset, formats
from workbench import ui

st.title("Dataset")
store = ui.store()
name = ui.dataset_picker()
if name is None:
    st.stop()

counts = dataset.status_counts(store, name)
split = dataset.latest_split(store, name)
cols = st.columns(4)
for col, status in zip(cols, dataset.STATUSES):
    col.metric(status.capitalize(), counts[status])
cols[3].metric(
    "Split",
    f"v{split.version}: {split.train}/{split.test}" if split else "none",
    help="Latest frozen train/test split over the accepted pairs",
)

browse, upload, split_tab = st.tabs(["Pairs", "Import a file", "Split & export"])

with browse:
    left, right = st.columns([1, 2])
    statuses = left.multiselect("Status", dataset.STATUSES, default=list(dataset.STATUSES))
    search = right.text_input("Search questions and answers", placeholder="e.g. baseline")
    frame = dataset.pairs_frame(store, name)
    frame = frame[frame["status"].isin(statuses)]
    if search:
        hit = frame["question"].str.contains(search, case=False, regex=False) | frame["answer"].str.contains(
            search, case=False, regex=False
        )
        frame = frame[hit]
    st.caption(f"{len(frame)} pair(s) shown")
    st.dataframe(
        frame[["id", "question", "answer", "field", "status"]],
        hide_index=True,
        width="stretch",
        height=520,
        column_config={"id": st.column_config.NumberColumn("id", format="%d", width="small")},
    )

with upload:
    st.markdown(
        "CSV (header with `question`, `answer`, optional `field`; extra columns are kept), "
        "a JSON array of objects, or JSONL. A file with any problem is refused whole."
    )
    with st.form("import"):
        uploaded = st.file_uploader("File", type=[e.lstrip(".") for e in formats.SUPPORTED_EXTENSIONS])
        target = st.text_input("Into dataset", value=name, help="A new name creates a new dataset.")
        status = st.selectbox("Imported pairs are", dataset.STATUSES, index=1)
        submitted = st.form_submit_button("Import", icon=":material/upload:")
    if submitted:
        if uploaded is None:
            st.error("Choose a file first.")
        else:
            parsed = ui.attempt(lambda: formats.parse_pairs(uploaded.getvalue(), uploaded.name))
            if parsed is not None:
                summary = ui.attempt(lambda: dataset.import_parsed(store, parsed, target, status))
                if summary is not None:
                    st.success(dataset.describe_import(summary))
                    st.session_state["current_dataset"] = summary.dataset

with split_tab:
    st.markdown(
        "A split is frozen: drawing a new one creates a new version, and earlier runs keep the "
        "version they used. Stratified by field where possible."
    )
    c1, c2, c3 = st.columns([1, 1, 2])
    test_size = c1.number_input("Test share", min_value=0.05, max_value=0.95, value=0.2, step=0.05)
    seed = c2.number_input("Seed", min_value=0, value=42, step=1)
    if c3.button("Draw a new split", icon=":material/call_split:"):
        info = ui.attempt(lambda: dataset.make_split(store, name, float(test_size), int(seed)))
        if info:
            st.success(f"split v{info.version}: {info.train} train / {info.test} test")
            split = info
    st.divider()
    st.subheader("Export accepted pairs")
    parts = ["all", "train", "test"] if split else ["all"]
    part = st.radio(
        "Part",
        parts,
        horizontal=True,
        help="train/test use the latest split" if split else "draw a split to export its parts",
    )
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, mime in (("jsonl", "application/jsonl"), ("csv", "text/csv")):
            path = Path(tmp) / f"{name}-{part}.{fmt}"
            n = ui.attempt(lambda path=path, fmt=fmt: dataset.export_pairs(store, name, path, fmt, part))
            if n is not None:
                st.download_button(
                    f"Download {fmt.upper()} ({n} pairs)",
                    path.read_bytes(),
                    file_name=path.name,
                    mime=mime,
                    icon=":material/download:",
                    key=f"dl-{fmt}",
                )
