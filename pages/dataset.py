"""Dataset: generate candidates, review them one at a time or in a table, import, split, export.

Every action is saved at once (with its history); Undo reverts the last change. Text from
users and models is shown as text, never as HTML. The Generate and Quality flags forms are built
from their configurations' fields (workbench.forms), as the CLI's flags are.
"""

from collections.abc import Callable

import streamlit as st

from core import dataset, formats, intake, jobs, qa_generation, quality
from core.backends import USER_BACKENDS
from core.errors import Conflict, WorkbenchError
from core.store import Store
from workbench import forms, ui

PAGE_SIZE = 200
FLAG_VIEWS = {"all": "all pairs", "any": "any flag"}


@st.fragment(run_every=3.0)
def header(name: str) -> None:
    """Counts per status, always in view (refreshes while a generation job adds pairs)."""
    store = ui.store()
    counts = dataset.status_counts(store, name)
    split = dataset.latest_split(store, name)
    cols = st.columns([1, 1, 1, 1, 2])
    for col, status in zip(cols, dataset.STATUSES):
        col.metric(status.capitalize(), counts[status])
    cols[3].metric(
        "Split",
        f"v{split.version}: {split.train}/{split.validation}/{split.test}" if split else "none",
        help="Latest frozen split over the accepted pairs: train / validation / test",
    )
    last = dataset.last_change(store, name)
    with cols[4]:
        st.caption("Last change")
        if last is None:
            st.text("nothing to undo")
        elif st.button(f"Undo: {last.summary}", icon=":material/undo:", shortcut="ctrl+z", key="undo"):
            ui.attempt(lambda: dataset.undo_last_change(store, name, last.id), f"undone: {last.summary}")
            st.rerun()


def flag_picker(where, key: str) -> str:
    return where.selectbox(
        "Flag",
        ["all", "any", *quality.FLAGS],
        key=key,
        format_func=lambda f: FLAG_VIEWS.get(f, f.replace("_", " ")),
    )


# ---- review queue --------------------------------------------------------------------------------------


def show_flags(pair: dict) -> None:
    for flag in pair["flags"]:
        st.badge(flag.replace("_", " "), icon=":material/flag:", color="orange", help=quality.FLAGS.get(flag, ""))
    if pair["duplicate_of"]:
        other = dataset.get_pair(ui.store(), int(pair["duplicate_of"]))
        st.caption(
            f"Near-duplicate (similarity {pair['duplicate_score']:.2f}) of pair {other['id']} ({other['status']}):"
        )
        st.text(other["question"])


def act(pair: dict, **changes: str) -> None:
    """Save one review action against the version the user saw (an edit made meanwhile is not overwritten)."""
    seen = st.session_state.get("seen_pair")
    if seen is None or seen[0] != pair["id"]:  # the queue moved on (another tab, a generation job)
        st.warning("The queue changed since you looked: here is the pair now at its head.", icon=":material/sync:")
        return
    if ui.attempt(lambda: dataset.update_pair(ui.store(), pair["id"], expected_version=seen[1], **changes)):
        st.rerun()


def editing_key(name: str) -> str:
    """Where an open edit of this dataset lives: {"id": pair, "base": version the form was filled from,
    "conflict": bool, "theirs": version shown beside it in a conflict}. It stays on screen, whatever the queue
    does meanwhile (another tab accepting the pair, a filter), until it is saved or given up: typed text is
    never dropped."""
    return f"editing-{name}"


def show_text(pair: dict) -> None:
    st.markdown("**Question**")
    st.text(pair["question"])
    st.markdown("**Answer**")
    st.text(pair["answer"])


def edit_form(pair: dict) -> dict[str, str]:
    """The edit form (keyed, so the typed text survives every rerun while it is drawn); returns what it holds."""
    return {
        "question": st.text_area("Question", pair["question"], key=f"q-{pair['id']}"),
        "answer": st.text_area("Answer", pair["answer"], height=180, key=f"a-{pair['id']}"),
        "field": st.text_input("Field", pair["field"], key=f"f-{pair['id']}"),
    }


def close_edit(name: str) -> None:
    st.session_state.pop(editing_key(name), None)
    st.rerun()


def save_edit(name: str, edit: dict, typed: dict[str, str], base: int) -> None:
    """Save the typed pair, accepted, over version `base`; if the store holds another version now, show both."""
    try:
        dataset.update_pair(ui.store(), edit["id"], expected_version=base, status="accepted", **typed)
    except Conflict:
        edit["conflict"] = True
        st.rerun()
    except WorkbenchError as exc:  # e.g. an emptied answer: the form stays as typed
        st.error(ui.plain(exc), icon=":material/error:")
        return
    close_edit(name)


def editor(name: str, pair: dict, edit: dict) -> None:
    typed = edit_form(pair)
    # The version whose text filled the form: reruns while typing re-read the pair but must not move the base.
    edit.setdefault("base", pair["version"])
    b1, b2, _ = st.columns([1, 1, 3])
    if b1.button("Save & accept", type="primary", icon=":material/check:", shortcut="ctrl+enter"):
        save_edit(name, edit, typed, edit["base"])
    if b2.button("Cancel edit", icon=":material/close:", shortcut="escape"):
        close_edit(name)


def conflict_view(name: str, pair: dict, edit: dict) -> None:
    """The typed edit beside the version now in the store; the user picks one, or goes on editing."""
    st.warning(
        f"Pair {pair['id']} was changed elsewhere while you edited it (now version {pair['version']},"
        f" {pair['status']}); nothing was saved. Your text is kept: save it over the other version,"
        " take the other version, or keep editing.",
        icon=":material/sync_problem:",
    )
    mine, theirs = st.columns(2)
    with mine:
        st.markdown("**Your edit (not saved)**")
        typed = edit_form(pair)
    with theirs:
        st.markdown(f"**Now in the store (version {pair['version']}, {pair['status']})**")
        show_text(pair)
        st.caption(f"Field: {ui.plain(pair['field'] or '—')}")
    b1, b2, b3, _ = st.columns([1.2, 1.3, 1, 1.5])
    if b1.button("Save mine over it", type="primary", icon=":material/save:"):
        save_edit(name, edit, typed, edit["theirs"])
    if b2.button("Take the other version", icon=":material/undo:"):
        close_edit(name)
    if b3.button("Keep editing", icon=":material/edit:"):
        edit.update(base=edit["theirs"], conflict=False)  # the user has seen the other version now
        st.rerun()
    edit["theirs"] = pair["version"]  # what is on screen now is what the next click acts on


def review_tab(name: str) -> None:
    store = ui.store()
    c1, c2, c3 = st.columns([1, 1, 2])
    field = c1.selectbox("Field", ["all", *dataset.fields_of(store, name)], key="queue-field")
    flag = flag_picker(c2, "queue-flag")
    skipped: set[int] = st.session_state.setdefault(f"skipped-{name}", set())
    edit = st.session_state.get(editing_key(name))
    if edit:
        pair = dataset.get_pair(store, edit["id"])
    else:
        pair = dataset.next_in_queue(
            store, name, skipped, None if field == "all" else field, None if flag == "all" else flag
        )
    if skipped and c3.button(f"Bring back {len(skipped)} skipped", icon=":material/restart_alt:"):
        skipped.clear()
        st.rerun()
    if pair is None:
        st.success("Nothing pending here: every pair in this view is reviewed.", icon=":material/task_alt:")
        return
    with st.container(border=True):
        st.caption(f"Pair {pair['id']} · field: {ui.plain(pair['field'] or '—')} · version {pair['version']}")
        if edit and edit.get("conflict"):
            conflict_view(name, pair, edit)
        elif edit:
            editor(name, pair, edit)
        else:
            show_text(pair)
            show_flags(pair)
            b1, b2, b3, b4, _ = st.columns([1, 1, 1, 1, 2])
            if b1.button("Accept", type="primary", icon=":material/check:", shortcut="a"):
                act(pair, status="accepted")
            if b2.button("Reject", icon=":material/block:", shortcut="x"):
                act(pair, status="rejected")
            if b3.button("Edit", icon=":material/edit:", shortcut="e"):
                st.session_state[editing_key(name)] = {"id": st.session_state.get("seen_pair", (pair["id"],))[0]}
                st.rerun()
            if b4.button("Skip", icon=":material/skip_next:", shortcut="s"):
                skipped.add(st.session_state.get("seen_pair", (pair["id"],))[0])
                st.rerun()
            st.caption("Keys: A accept · X reject · E edit · S skip · Ctrl+Z undo · Ctrl+Enter saves an edit")
        if pair["provenance"].get("job_id"):
            with st.expander("Provenance"):
                st.json(pair["provenance"], expanded=False)
    # What is on screen now is what the next click acts on.
    st.session_state["seen_pair"] = (pair["id"], pair["version"])


# ---- table ---------------------------------------------------------------------------------------------


def table_tab(name: str) -> None:
    store = ui.store()
    f1, f2, f3, f4 = st.columns([1.2, 1.2, 1, 1.6])
    statuses = f1.multiselect("Status", dataset.STATUSES, default=list(dataset.STATUSES), key="t-status")
    fields = f2.multiselect("Field", dataset.fields_of(store, name), placeholder="all fields", key="t-field")
    t_flag = flag_picker(f3, "t-flag")
    search = f4.text_input("Search questions and answers", placeholder="e.g. baseline", key="t-search")
    frame = dataset.pairs_frame(store, name, statuses, fields or None, None if t_flag == "all" else t_flag, search)
    pages = max(1, -(-len(frame) // PAGE_SIZE))
    p1, p2 = st.columns([1, 4])
    page_no = p1.number_input("Page", 1, pages, 1, key="t-page") if pages > 1 else 1
    p2.caption(f"{len(frame)} pair(s) match · edits are saved as you make them · click a column header to sort")
    shown = frame.iloc[(page_no - 1) * PAGE_SIZE : page_no * PAGE_SIZE].copy()
    shown.insert(0, "select", False)
    shown["duplicate_of"] = shown["duplicate_of"].astype("Int64")
    editor_key = f"editor-{name}-{st.session_state.get('table_saves', 0)}"

    def save_table_edits() -> None:
        edited = st.session_state[editor_key]["edited_rows"]
        edits = {
            int(shown.iloc[i]["id"]): {k: v for k, v in row.items() if k in dataset.EDITABLE}
            for i, row in edited.items()
        }
        edits = {pid: c for pid, c in edits.items() if c}
        if edits:
            versions = {int(r["id"]): int(r["version"]) for _, r in shown.iterrows() if int(r["id"]) in edits}
            try:
                dataset.update_pairs(store, edits, versions)
            except WorkbenchError as exc:  # shown on the next run; the editor reloads saved values
                st.session_state["table_error"] = str(exc)
            st.session_state["table_saves"] = st.session_state.get("table_saves", 0) + 1

    if error := st.session_state.pop("table_error", None):
        st.error(ui.plain(error), icon=":material/error:")
    edited = st.data_editor(
        shown,
        key=editor_key,
        on_change=save_table_edits,
        hide_index=True,
        height=min(560, 35 * (len(shown) + 1) + 3),
        width="stretch",
        column_order=["select", "id", "status", "field", "flags", "question", "answer", "duplicate_of"],
        disabled=["id", "flags", "duplicate_of"],
        column_config={
            "select": st.column_config.CheckboxColumn("✓", width="small"),
            "id": st.column_config.NumberColumn("id", format="%d", width="small"),
            "question": st.column_config.TextColumn("question", width="medium"),
            "answer": st.column_config.TextColumn("answer", width="large"),
            "field": st.column_config.TextColumn("field", width="small"),
            "status": st.column_config.SelectboxColumn("status", options=dataset.STATUSES, required=True),
            "flags": st.column_config.ListColumn("flags", width="medium"),
            "duplicate_of": st.column_config.NumberColumn("dup of", format="%d", width="small"),
        },
    )
    chosen = [int(i) for i in edited.loc[edited["select"], "id"]]
    everything = st.checkbox(f"Apply to all {len(frame)} matching pairs, not only the ticked ones", key="t-all")
    targets = [int(i) for i in frame["id"]] if everything else chosen
    b1, b2, b3, _ = st.columns([1, 1, 1, 2])
    for col, label, status, icon in (
        (b1, "Accept", "accepted", ":material/check:"),
        (b2, "Reject", "rejected", ":material/block:"),
        (b3, "Back to pending", "pending", ":material/undo:"),
    ):
        if col.button(f"{label} ({len(targets)})", disabled=not targets, icon=icon, key=f"bulk-{status}"):
            ui.attempt(
                lambda status=status: dataset.set_status(store, targets, status), f"{len(targets)} pair(s) {status}"
            )
            st.session_state["table_saves"] = st.session_state.get("table_saves", 0) + 1
            st.rerun()


# ---- generate ------------------------------------------------------------------------------------------


def generate_tab(name: str) -> None:
    store = ui.store()
    Config = qa_generation.QAGenerationConfig
    st.markdown(
        "Ask a model for research questions on your topics, then for an answer to each. "
        "The pairs arrive here as **pending**; output that is not a usable pair is dropped and counted."
    )
    with st.form("generate"):
        values = forms.config_form(
            Config,
            key="generate",
            only=("topics", "n", "backend"),
            defaults={"topics": ["machine learning", "nlp", "systems"]},
            labels={"topics": "Topics or fields", "n": "Pairs"},
            widgets={"backend": {"options": USER_BACKENDS}},  # the echo backend is for tests
            columns=[3, 1, 1],
        )
        values |= forms.config_form(
            Config,
            key="generate",
            only=("model", "question_prompt", "answer_prompt", "min_answer_words"),
            widgets={"question_prompt": {"height": 120}, "answer_prompt": {"height": 70}},
        )
        defaults = Config(dataset=name, topics=["x"])
        questions, answers = st.columns(2)
        with questions.popover("Decoding of the questions"):
            values["question_params"] = ui.attempt(lambda: ui.decoding_sliders("generate-q", defaults.question_params))
        with answers.popover("Decoding of the answers"):
            values["answer_params"] = ui.attempt(lambda: ui.decoding_sliders("generate-a", defaults.answer_params))
        go = st.form_submit_button("Generate", type="primary", icon=":material/auto_awesome:")
    if go and values["question_params"] and values["answer_params"]:
        start = lambda: qa_generation.submit(store, Config.from_dict({"dataset": name, **values}))  # noqa: E731
        if job_id := ui.attempt(start, "generation started"):
            st.session_state[f"generate_job-{name}"] = job_id
    recent = [j for j in jobs.list_jobs(store, kind="generate-qa", limit=20) if j.params.get("dataset") == name]
    if recent:
        ui.job_panel(st.session_state.get(f"generate_job-{name}", recent[0].id))


# ---- import --------------------------------------------------------------------------------------------


def upload_tab(name: str) -> None:
    store = ui.store()
    st.markdown(
        "CSV (header with `question`, `answer`, optional `field`; extra columns are kept), "
        "a JSON array of objects, or JSONL. A file with any problem is refused whole."
    )
    with st.form("import"):
        uploaded = st.file_uploader("File", type=[e.lstrip(".") for e in formats.SUPPORTED_EXTENSIONS])
        target = st.text_input("Into dataset", value=name, help="A new name creates a new dataset.")
        status = st.selectbox("Imported pairs are", dataset.STATUSES, index=1)
        submitted = st.form_submit_button("Import", icon=":material/upload:")
    if not submitted:
        return
    if uploaded is None:
        st.error("Choose a file first.")
        return
    parsed = ui.attempt(lambda: formats.parse_pairs(uploaded.getvalue(), uploaded.name))
    if parsed is None:
        return
    summary = ui.attempt(lambda: intake.import_parsed(store, parsed, target, status))
    if summary is None:
        return
    ui.switch_dataset(summary.dataset)
    if warning := intake.describe_pending_flags(summary):  # shown now: a rerun would hide it
        st.success(ui.plain(intake.describe_import(summary)), icon=":material/check_circle:")
        st.warning(ui.plain(warning), icon=":material/flag:")
    else:
        ui.flash(intake.describe_import(summary))
        st.rerun()


# ---- split & export ------------------------------------------------------------------------------------


def export_on_click(dataset_name: str, fmt: str, part: str) -> Callable[[], str]:
    """An export built only when its download button is clicked, in memory (no file is written)."""
    path = ui.store().path

    def build() -> str:
        with Store(path) as own:  # Streamlit calls this on a thread of its own: its own connection
            return dataset.export_text(own, dataset_name, fmt, part)

    return build


def split_tab(name: str) -> None:
    store = ui.store()
    st.markdown(
        "A split is frozen: drawing a new one creates a new version, and earlier runs keep the "
        "version they used. Stratified by field where possible. **Train** is trained on; **validation** is "
        "what choices are made on (the best decoding configuration, a search's trials, eval loss); **test** "
        "is only reported on, so that its numbers are not flattered by the choices."
    )
    c1, c2, c3, c4 = st.columns([1, 1, 1, 2])
    test_size = c1.number_input("Test share", min_value=0.05, max_value=0.9, value=dataset.DEFAULT_TEST_SIZE, step=0.05)
    validation_size = c2.number_input(
        "Validation share",
        min_value=0.0,
        max_value=0.5,
        value=dataset.DEFAULT_VALIDATION_SIZE,
        step=0.05,
        help="0 draws no validation part: choices are then made on the test questions and reported optimistic",
    )
    seed = c3.number_input("Seed", min_value=0, value=dataset.DEFAULT_SPLIT_SEED, step=1)
    split = dataset.latest_split(store, name)
    if c4.button("Draw a new split", icon=":material/call_split:"):
        info = ui.attempt(lambda: dataset.make_split(store, name, float(test_size), int(seed), float(validation_size)))
        if info:
            st.success(f"split {info.describe()}")
            split = info
    if split is not None and not split.validation:
        st.info(ui.plain(dataset.no_validation_message(split)), icon=":material/info:")
    versions = dataset.list_splits(store, name)
    if versions:
        st.dataframe(versions, hide_index=True, width="stretch")
    st.divider()
    st.subheader("Export accepted pairs")
    parts = ["all", *(p for p in dataset.PARTS if split.size(p))] if split else ["all"]
    part = st.radio(
        "Part",
        parts,
        horizontal=True,
        help="the parts of the latest split" if split else "draw a split to export its parts",
    )
    n_rows = ui.attempt(lambda: len(dataset.select_pairs(store, name, part)))
    if n_rows is not None:
        for fmt, mime in (("jsonl", "application/jsonl"), ("csv", "text/csv")):
            st.download_button(
                f"Download {fmt.upper()} ({n_rows} pairs)",
                export_on_click(name, fmt, part),
                file_name=dataset.download_name(name, part, fmt),
                mime=mime,
                icon=":material/download:",
                key=f"dl-{fmt}",
            )


# ---- quality flags -------------------------------------------------------------------------------------


def quality_tab(name: str) -> None:
    store = ui.store()
    saved = quality.load_config(store)
    st.markdown("Flags guide review; they never change or delete a pair.")
    st.dataframe([{"flag": k, "meaning": v} for k, v in quality.FLAGS.items()], hide_index=True, width="stretch")
    with st.form("quality"):
        values = forms.config_form(
            quality.QualityConfig,
            key="quality",
            only=("duplicate_threshold", "repeat_overlap", "min_answer_words", "max_answer_words"),
            defaults=saved,
            labels={
                "duplicate_threshold": "Near-duplicate threshold (cosine similarity of question embeddings)",
                "repeat_overlap": "Restated-question overlap",
                "min_answer_words": "Answers shorter than (words)",
                "max_answer_words": "Answers longer than (words)",
            },
            widgets={"duplicate_threshold": {"step": 0.01}, "repeat_overlap": {"step": 0.01}},
            columns=2,
        )
        if st.form_submit_button("Save and re-flag", icon=":material/flag:"):

            def reflag() -> quality.FlagSummary:
                quality.save_config(store, quality.QualityConfig.from_dict(values))
                return quality.flag_dataset(store, name)

            if summary := ui.attempt(reflag):
                st.success(
                    f"re-flagged {summary.pairs} pairs: "
                    + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in summary.counts.items() if v)
                )


# ---- the page ------------------------------------------------------------------------------------------

TABS = {
    "Review queue": review_tab,
    "Table": table_tab,
    "Generate": generate_tab,
    "Import a file": upload_tab,
    "Split & export": split_tab,
    "Quality flags": quality_tab,
}


def render() -> None:
    st.title("Dataset")
    name = ui.dataset_picker()
    if name is None:
        return
    header(name)
    ui.show_flashes()
    for tab, draw in zip(st.tabs(list(TABS)), TABS.values()):
        with tab:
            draw(name)


render()
