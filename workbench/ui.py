"""Shared Streamlit pieces: the store for this script run, error banners, job panels.

Pages stay thin: they read widgets, call one core function and draw with these helpers.
Text from users and models is always rendered as text (st.text / st.code / dataframes),
never as HTML.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st

from core import dataset, intake, jobs
from core.errors import WorkbenchError
from core.store import Store

log = logging.getLogger("workbench")
_local = threading.local()
_starter_lock = threading.Lock()


_MARKDOWN = re.compile(r"([\\`*_{}\[\]<>()#!|$~])")
# List and rule markers mean something only where a line starts.
_LINE_START = re.compile(r"^(\s*\d*)([.+\-=])", re.MULTILINE)
# Streamlit turns bare URLs into links, where a backslash escape would show: a URL becomes a code span.
_URL = re.compile(r"https?://[^\s`]+")


def plain(text: object) -> str:
    """Text for a widget that renders Markdown (banners, captions, labels), shown exactly as written."""
    text, shown, start = str(text), [], 0
    for url in _URL.finditer(text):
        shown += [_escape(text[start : url.start()]), f"`{url.group()}`"]
        start = url.end()
    return "".join([*shown, _escape(text[start:])])


def _escape(text: str) -> str:
    return _LINE_START.sub(r"\1\\\2", _MARKDOWN.sub(r"\\\1", text))


def store() -> Store:
    """One connection per thread (Streamlit runs each script run in a thread of its own)."""
    if getattr(_local, "store", None) is None:
        _local.store = Store()
        with _starter_lock:
            intake.ensure_starter(_local.store)
    return _local.store


def run_page(page: Callable[[], None] | st.navigation) -> None:
    """Run a page; a user-caused error becomes a red one-line banner, a bug a short one (logged in full)."""
    try:
        page.run() if hasattr(page, "run") else page()
    except WorkbenchError as exc:
        st.error(plain(exc), icon=":material/error:")
    except Exception as exc:  # never show a stack trace in the page
        log.exception("page failed")
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        st.error(
            f"Something went wrong: {type(exc).__name__}: {plain(first_line)} (details in the server log)",
            icon=":material/bug_report:",
        )


def attempt(action: Callable[[], object], success: str | None = None) -> object | None:
    """Run a button's action; show its error as a banner instead of raising."""
    try:
        result = action()
    except WorkbenchError as exc:
        st.error(plain(exc), icon=":material/error:")
        return None
    if success:
        st.toast(success, icon=":material/check_circle:")
    return result


def dataset_picker(key: str = "dataset", label: str = "Dataset") -> str | None:
    """Pick a dataset; the choice lives in the URL (?dataset=…), so a reload keeps it."""
    names = dataset.list_datasets(store())
    if not names:
        st.info("No dataset yet: import a file on the Dataset page.")
        return None
    switch = st.session_state.pop("switch_dataset", None)
    if switch in names:
        st.session_state[key] = switch
    elif st.session_state.get(key) not in names and st.query_params.get("dataset") in names:
        st.session_state[key] = st.query_params["dataset"]
    chosen = st.selectbox(label, names, key=key)
    st.query_params["dataset"] = chosen
    return chosen


def switch_dataset(name: str) -> None:
    """Make the picker show `name` on the next run (a widget's value cannot change after it is drawn)."""
    st.session_state["switch_dataset"] = name


def flash(message: str) -> None:
    """A success message that survives the rerun that follows an action."""
    st.session_state.setdefault("_flash", []).append(message)


def show_flashes() -> None:
    for message in st.session_state.pop("_flash", []):
        st.success(plain(message), icon=":material/check_circle:")


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


STATE_ICONS = {
    "queued": ":material/schedule:",
    "running": ":material/autorenew:",
    "done": ":material/check_circle:",
    "interrupted": ":material/pause_circle:",
    "cancelled": ":material/cancel:",
    "failed": ":material/error:",
}


def _figure_text(figures: dict) -> str:
    """Numeric figures as 'value name', four significant digits (a learning rate of 2e-4 stays visible)."""
    names = {"tokens_per_s": "tokens/s", "items_per_s": "items/s", "peak_memory_mb": "MB peak memory"}
    return " · ".join(
        f"{v:,.4g} {names.get(k, k.replace('_', ' '))}"
        for k, v in figures.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("_id")  # ids are not figures
    )


def job_panel(job_id: int, log_lines: int = 12, figures: bool = True) -> None:
    """Progress, figures (unless the page draws them itself), Cancel/Resume and the log tail of one job;
    refreshes itself while it runs."""

    def body() -> None:
        job = jobs.get(store(), job_id)
        active = job.state in jobs.ACTIVE
        with st.container(border=True):
            head, cancel, resume = st.columns([6, 1, 1])
            when = ""
            if not active and job.finished_at:
                when = (
                    f" · finished {time.strftime('%m-%d %H:%M', time.localtime(job.finished_at))}"
                    f" after {_fmt_seconds(job.seconds_running)}"
                )
            head.markdown(f"{STATE_ICONS.get(job.state, '')} **Job {job.id}** · {job.kind} · `{job.state}`{when}")
            if active and cancel.button("Cancel", key=f"cancel-{job.id}", icon=":material/stop:"):
                attempt(lambda: jobs.request_cancel(store(), job.id), "cancel requested")
            if job.resumable and resume.button("Resume", key=f"resume-{job.id}", icon=":material/play_arrow:"):
                attempt(lambda: jobs.resume(store(), job.id), f"job {job.id} resumed")
            if not job.responding:
                since = time.strftime("%H:%M:%S", time.localtime(job.heartbeat_at))
                st.warning(
                    f"Not responding since {since} (no report for {_fmt_seconds(job.silent_for)}); "
                    "it may be stuck in a native call. Kill ends its processes; it stays resumable.",
                    icon=":material/hourglass_disabled:",
                )
                if st.button("Kill", key=f"kill-{job.id}", icon=":material/dangerous:"):
                    attempt(lambda: jobs.kill(store(), job.id), "job killed")
            elif active and job.cancel_requested:
                st.caption("Cancel requested: it stops after its current step (a checkpoint is written first).")
            label = f"{job.done}/{job.total}" if job.total else f"{job.done}"
            left = _fmt_seconds(job.seconds_left)
            st.progress(job.fraction, text=f"{label}{' · ' + left + ' left' if left else ''} · {plain(job.message)}")
            if figures and (text := _figure_text(job.figures)):
                st.caption(text)
            tail = jobs.log_tail(store(), job.id, log_lines)
            if tail:
                with st.expander("Log", expanded=active or job.state in ("failed", "interrupted")):
                    st.code("\n".join(tail), language=None)

    @st.fragment(run_every=1.0)
    def panel() -> None:
        run_page(body)  # a fragment's reruns bypass the page's own guard

    panel()


def pick_row(frame: pd.DataFrame, key: str, column_config: dict | None = None) -> int | None:
    """A table in which one row can be selected; returns the selected row's position, or None."""
    picked = st.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        on_select="rerun",
        selection_mode="single-row",
        key=key,
        column_config=column_config,
    )
    rows = picked.selection.rows if picked else []
    return rows[0] if rows else None


def jobs_frame(limit: int = 50) -> pd.DataFrame:
    rows = [
        {
            "id": j.id,
            "kind": j.kind,
            "state": j.state,
            "progress": j.fraction,
            "done": j.done,
            "total": j.total,
            "message": j.message,
            "started": time.strftime("%m-%d %H:%M", time.localtime(j.started_at)) if j.started_at else "",
        }
        for j in jobs.list_jobs(store(), limit=limit)
    ]
    return pd.DataFrame(rows, columns=["id", "kind", "state", "progress", "done", "total", "message", "started"])


JOB_COLUMNS = {
    "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
    "id": st.column_config.NumberColumn("id", format="%d"),
}


@st.cache_resource(max_entries=3, show_spinner="Loading the model ...")
def loaded_backend(name: str, model: str, options: tuple[tuple[str, Any], ...] = ()):
    """A backend kept loaded across reruns and sessions, so the next answer starts at once; `options` (a server's
    URL, say) as sorted pairs, so that a change in Settings gives another backend.

    Native engines run in a process of their own: a crash there is an error banner, not the end of the app.
    """
    from core.engine_process import isolated_backend

    return isolated_backend(name, model or None, **dict(options))


@st.cache_data(ttl=3600, show_spinner="Asking the llama.cpp engine for its CPU features ...")
def engine_summary() -> str:
    """One line on the installed engine, from a process of its own (loading it here could crash the app)."""
    from core.engine_process import describe_engine

    return describe_engine()


@st.cache_resource(max_entries=2, show_spinner="Loading the BERTScore model ...")
def loaded_scorer(model: str):
    from core import scoring

    return scoring.Scorer(scoring.ScorerConfig(model=model))


# Decoding parameter -> (key suffix, step, slider range); top_k and max_tokens get narrower sliders than their limits.
DECODING_SLIDERS = {
    "temperature": ("t", 0.05, None),
    "top_p": ("p", 0.01, None),
    "top_k": ("k", 1, (0, 200)),
    "max_tokens": ("m", 1, (1, 1024)),
    "repeat_penalty": ("r", 0.01, None),
    "seed": ("s", None, None),
}


def decoding_sliders(key: str, defaults=None):
    """Sliders for every decoding parameter (the seed a number box: empty draws a fresh one), from the fields'
    ranges and help texts."""
    from core.config import specs
    from core.decoding import DecodingParams
    from workbench.forms import widget

    d = defaults or DecodingParams()
    values = {}
    for field in specs(DecodingParams):
        suffix, step, bounds = DECODING_SLIDERS[field.name]
        shown = getattr(d, field.name)
        if field.optional:
            values[field.name] = widget(field, shown, f"{key}-{suffix}", label=field.name, placeholder="random")
        else:
            values[field.name] = widget(
                field, shown, f"{key}-{suffix}", label=field.name, slider=True, bounds=bounds, step=step
            )
    return DecodingParams.from_dict(values)
