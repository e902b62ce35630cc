"""Background jobs: long work (generation, sweeps, training) in its own process.

A job is a row in the store plus a process `python -m workbench run-job ID` in its own
process group: a small supervisor (the group's leader, whose pid the row keeps) and the
worker it starts, which runs the job's function. The worker reports progress, figures, log
lines and a heartbeat through the store; anyone (a page, the CLI) reads them back. Liveness
is judged from the supervisor (pid + start time), so a job whose processes died is shown
`interrupted`, never a stale `running`; a worker that dies of a signal (a native crash, the
OOM killer) is reported `failed` with the signal and its last log lines by its supervisor.
A job function must commit each finished item, so that `resume` skips it.
This module never knows what a job does; kinds are looked up in JOB_KINDS.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from core import processes, workspace
from core.errors import BadInput, NotFound, WorkbenchError
from core.store import Store, from_row, now

# kind -> "module:function"; functions take a JobContext. Imported lazily so that listing
# jobs never loads torch.
JOB_KINDS: dict[str, str] = {
    "generate": "core.generation:run_generation_job",
    "prepare-models": "core.models:prepare_models_job",
    "generate-qa": "core.qa_generation:run_generate_qa_job",
    "sweep": "core.sweep:run_sweep_job",
    "train": "core.training:run_train_job",
    "train-search": "core.train_search:run_train_search_job",
    "evaluate": "core.evaluation:run_evaluate_job",
    "judge": "core.judging:run_judge_job",
}

# Kinds that fill the accelerator (or every CPU core): one runs at a time, the others wait queued.
DEVICE_KINDS = ("train", "train-search")
ACTIVE = ("queued", "running")
RESUMABLE = ("interrupted", "cancelled", "failed")
HEARTBEAT_SECONDS = 2.0
# No heartbeat for this long: the job is shown "not responding" (a hung native call, a deadlock). A
# cancelled job is only forced to stop once it is not responding: one that still beats is finishing its
# step or writing its checkpoint, however long that takes.
HEARTBEAT_STALE_SECONDS = 30.0
CANCEL_GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class JobCancelled(Exception):
    """Raised inside a job when the user asked it to stop."""


class JobPaused(WorkbenchError):
    """A job cannot go on for now (e.g. its server vanished); it stops resumable."""


@dataclass
class JobInfo:
    id: int
    kind: str
    params: dict[str, Any]
    state: str
    done: int
    total: int | None
    message: str
    figures: dict[str, Any]
    error: str
    pid: int | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested: bool = False
    seconds_running: float = field(default=0.0)
    heartbeat_at: float | None = None

    @property
    def silent_for(self) -> float | None:
        """Seconds since a running job last reported (None when it is not running or never beat)."""
        return now() - self.heartbeat_at if self.state == "running" and self.heartbeat_at else None

    @property
    def responding(self) -> bool:
        return self.silent_for is None or self.silent_for < HEARTBEAT_STALE_SECONDS

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 0.0

    @property
    def seconds_left(self) -> float | None:
        """A naive estimate from this attempt's pace; None until there is one."""
        rate = self.figures.get("items_per_s")
        if not self.total or not rate or self.state != "running":
            return None
        return max(self.total - self.done, 0) / rate

    @property
    def resumable(self) -> bool:
        return self.state in RESUMABLE


def _row_to_info(row: Any) -> JobInfo:
    started = row["started_at"]
    end = row["finished_at"] or (now() if row["state"] == "running" else started)
    return from_row(
        JobInfo,
        row,
        ("params", "figures"),
        cancel_requested=row["cancel_requested_at"] is not None,
        seconds_running=(end - started) if started and end else 0.0,
    )


# ---- the controlling side: pages and CLI -------------------------------------------------


def submit(store: Store, kind: str, params: dict[str, Any], start: bool = True) -> int:
    """Record a job and (by default) start its process; returns the job id."""
    if kind not in JOB_KINDS:
        raise BadInput(f"unknown job kind {kind!r}")
    job_id = store.execute(
        "INSERT INTO jobs (kind, params, state, created_at) VALUES (?, ?, 'queued', ?)",
        (kind, json.dumps(params), now()),
    ).lastrowid
    assert job_id is not None  # an INSERT always sets it
    if start:
        _start(store, job_id)
    return job_id


def _start(store: Store, job_id: int) -> None:
    try:
        spawn(store, job_id)
    except OSError as exc:  # the job stays visible, failed with the reason, and can be resumed
        store.execute(
            "UPDATE jobs SET state = 'failed', error = ?, message = ?, finished_at = ? WHERE id = ?",
            (str(exc), f"could not start the job's process: {exc}", now(), job_id),
        )
        raise BadInput(f"could not start job {job_id}: {exc}") from None


def spawn(store: Store, job_id: int) -> subprocess.Popen:
    """Start the job's own process in a new process group (so cancel can end its children)."""
    log_path = workspace.jobs_dir() / f"{job_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WORKBENCH_HOME": str(workspace.home())}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workbench", "run-job", str(job_id)],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _record_process(store, job_id, proc.pid)
    # Reap the child when it exits, so it does not linger as a zombie of a long-lived app.
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


def _record_process(store: Store, job_id: int, pid: int) -> None:
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        started = None
    store.execute("UPDATE jobs SET pid = ?, pid_started = ? WHERE id = ?", (pid, started, job_id))


def _alive(pid: int | None, pid_started: float | None) -> bool:
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # A different process may have been given the same pid (e.g. after a reboot).
        return pid_started is None or abs(proc.create_time() - pid_started) < 1.0
    except psutil.Error:
        return False


def reconcile(store: Store) -> None:
    """Bring job states in line with reality: dead processes, overdue cancels."""
    rows = store.query("SELECT * FROM jobs WHERE state IN ('queued', 'running')")
    for row in rows:
        alive = _alive(row["pid"], row["pid_started"])
        if not alive and row["pid"] is not None:
            processes.kill_group(row["pid"])  # its leader died: end what is left (ranks, workers)
            # Re-check under the write lock: the job may have finished on its own meanwhile.
            with store.transaction() as conn:
                state = conn.execute("SELECT state FROM jobs WHERE id = ?", (row["id"],)).fetchone()[0]
                if state in ACTIVE:
                    cancelled = row["cancel_requested_at"] is not None
                    conn.execute(
                        "UPDATE jobs SET state = ?, message = ?, finished_at = ? WHERE id = ?",
                        (
                            "cancelled" if cancelled else "interrupted",
                            "cancelled" if cancelled else "the job's process ended unexpectedly; resume to continue",
                            now(),
                            row["id"],
                        ),
                    )
        elif alive and row["cancel_requested_at"] and row["state"] == "running":
            _force_if_not_responding(row)


def _force_if_not_responding(row: Any) -> None:
    """A cancelled job that stopped reporting gets SIGTERM, and SIGKILL if it is still silent a grace later.

    The heartbeat's age is the clock, so nobody waits here: each reader's reconcile does the next step.
    The job's pid is its group's id (start_new_session), so this works after the leader died too.
    """
    silent = now() - max(row["heartbeat_at"] or 0.0, row["cancel_requested_at"])
    if silent > HEARTBEAT_STALE_SECONDS + CANCEL_GRACE_SECONDS:
        processes.kill_group(row["pid"], signal.SIGKILL)
    elif silent > HEARTBEAT_STALE_SECONDS:
        processes.kill_group(row["pid"], signal.SIGTERM)


def get(store: Store, job_id: int) -> JobInfo:
    reconcile(store)
    row = store.one("SELECT * FROM jobs WHERE id = ?", (job_id,))
    if row is None:
        raise NotFound(f"no job with id {job_id}")
    return _row_to_info(row)


def list_jobs(store: Store, kind: str | None = None, limit: int = 100) -> list[JobInfo]:
    reconcile(store)
    sql = "SELECT * FROM jobs"
    args: tuple[str, ...] = ()
    if kind:
        sql, args = sql + " WHERE kind = ?", (kind,)
    return [_row_to_info(r) for r in store.query(sql + f" ORDER BY id DESC LIMIT {int(limit)}", args)]


def request_cancel(store: Store, job_id: int) -> JobInfo:
    """Ask a job to stop; it checks between items. Overdue jobs are killed by reconcile()."""
    job = get(store, job_id)
    if job.state not in ACTIVE:
        raise BadInput(f"job {job_id} is {job.state}; only queued or running jobs can be cancelled")
    store.execute("UPDATE jobs SET cancel_requested_at = ? WHERE id = ?", (now(), job_id))
    # A job whose process never started has nobody to notice the request.
    store.execute(
        "UPDATE jobs SET state = 'cancelled', message = 'cancelled before it started', finished_at = ?"
        " WHERE id = ? AND state = 'queued' AND pid IS NULL",
        (now(), job_id),
    )
    return get(store, job_id)


def cancel(store: Store, job_id: int, wait: float = 120.0) -> JobInfo:
    """Cancel and wait up to `wait` seconds for the job to stop (it may still be running when this returns)."""
    request_cancel(store, job_id)
    deadline = time.monotonic() + wait
    job = get(store, job_id)
    while job.state in ACTIVE and time.monotonic() < deadline:
        time.sleep(0.2)
        job = get(store, job_id)
    return job


def kill(store: Store, job_id: int) -> JobInfo:
    """End a job's processes at once (for a job that is not responding); it stays resumable."""
    job = get(store, job_id)
    if job.state not in ACTIVE:
        raise BadInput(f"job {job_id} is {job.state}; only a queued or running job can be killed")
    store.execute(
        "UPDATE jobs SET cancel_requested_at = COALESCE(cancel_requested_at, ?) WHERE id = ?", (now(), job_id)
    )
    if job.pid:
        processes.kill_group(job.pid, signal.SIGKILL)
    return wait(store, job_id, timeout=10)


def _group_ended(pgid: int, grace: float = 3.0) -> bool:
    """Whether every process of a stopped job's group is gone; waits `grace` seconds, then kills what is left.

    A job that stopped by itself leaves its supervisor exiting for a few milliseconds more.
    """
    deadline = time.monotonic() + 2 * grace
    while processes.group_members(pgid):
        if time.monotonic() > deadline:
            return False
        if time.monotonic() > deadline - grace:
            processes.kill_group(pgid)
        time.sleep(0.05)
    return True


def resume(store: Store, job_id: int) -> JobInfo:
    """Start a stopped job again; its function skips the items it already committed."""
    job = get(store, job_id)
    if not job.resumable:
        raise BadInput(f"job {job_id} is {job.state}; only interrupted, cancelled or failed jobs can be resumed")
    if job.pid and not _group_ended(job.pid):  # two attempts must never share a device or a folder
        raise BadInput(f"job {job_id}'s previous processes are still ending; resume it again in a moment")
    claimed = store.execute(
        "UPDATE jobs SET state = 'queued', cancel_requested_at = NULL, error = '', finished_at = NULL,"
        " message = 'resuming', pid = NULL WHERE id = ? AND state IN ('interrupted', 'cancelled', 'failed')",
        (job_id,),
    ).rowcount
    if claimed != 1:  # another tab or the CLI resumed it a moment ago
        raise BadInput(f"job {job_id} is already being resumed")
    _start(store, job_id)
    return get(store, job_id)


def log_tail(store: Store, job_id: int, lines: int = 50) -> list[str]:
    rows = store.query("SELECT at, line FROM job_log WHERE job_id = ? ORDER BY id DESC LIMIT ?", (job_id, lines))
    return [f"{time.strftime('%H:%M:%S', time.localtime(r['at']))}  {r['line']}" for r in reversed(rows)]


def wait(store: Store, job_id: int, timeout: float | None = None, poll: float = 0.5) -> JobInfo:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = get(store, job_id)
        if job.state not in ACTIVE or (deadline and time.monotonic() > deadline):
            return job
        time.sleep(poll)


# ---- the job's own side ------------------------------------------------------------------


class JobContext:
    """What a running job function sees: its params, the store, and ways to report."""

    def __init__(self, store: Store, job_id: int, params: dict[str, Any]) -> None:
        self.store = store
        self.job_id = job_id
        self.params = params
        self._started = time.monotonic()
        self._done_at_start: int | None = None

    def progress(self, done: int, total: int | None = None, message: str | None = None, **figures: Any) -> None:
        """Report items done (cumulative, across resumes); figures such as tokens/s are merged."""
        if self._done_at_start is None:
            self._done_at_start = done
        elapsed = time.monotonic() - self._started
        if done > self._done_at_start and elapsed > 0:
            figures.setdefault("items_per_s", (done - self._done_at_start) / elapsed)
        with self.store.transaction() as conn:
            row = conn.execute("SELECT figures FROM jobs WHERE id = ?", (self.job_id,)).fetchone()
            merged = {**json.loads(row["figures"]), **figures}
            conn.execute(
                "UPDATE jobs SET done = ?, total = COALESCE(?, total), message = COALESCE(?, message),"
                " figures = ?, heartbeat_at = ? WHERE id = ?",
                (done, total, message, json.dumps(merged), now(), self.job_id),
            )

    def figures(self) -> dict[str, Any]:
        """Figures reported so far, including earlier attempts of a resumed job."""
        row = self.store.one_or_raise(
            "SELECT figures FROM jobs WHERE id = ?", (self.job_id,), f"no job with id {self.job_id}"
        )
        return json.loads(row["figures"])

    def log(self, line: str) -> None:
        self.store.execute(
            "INSERT INTO job_log (job_id, at, line) VALUES (?, ?, ?)", (self.job_id, now(), str(line)[:2000])
        )

    def cancelled(self) -> bool:
        row = self.store.one_or_raise(
            "SELECT cancel_requested_at FROM jobs WHERE id = ?", (self.job_id,), f"no job with id {self.job_id}"
        )
        return row["cancel_requested_at"] is not None

    def check_cancel(self) -> None:
        if self.cancelled():
            raise JobCancelled()


def _load_kind(kind: str):
    module, _, func = JOB_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), func)


def _heartbeat(job_id: int, stop: threading.Event) -> None:
    """Beat until stopped; a failed write (a locked or briefly unavailable store) is retried at the next beat."""
    store = Store()
    try:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                store.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ?", (now(), job_id))
            except sqlite3.Error as exc:
                print(f"heartbeat of job {job_id} not written: {exc}", file=sys.stderr, flush=True)
    finally:
        store.close()


def device_holder(store: Store, job_id: int, kind: str) -> int | None:
    """The job this one must wait for: a running device job, or a live one queued before it (FIFO)."""
    if kind not in DEVICE_KINDS:
        return None
    marks = ",".join("?" * len(DEVICE_KINDS))
    rows = store.query(
        f"SELECT id, state, pid, pid_started FROM jobs WHERE kind IN ({marks}) AND id != ?"
        " AND (state = 'running' OR (state = 'queued' AND id < ?)) ORDER BY state = 'running' DESC, id",
        (*DEVICE_KINDS, job_id, job_id),
    )
    return next((r["id"] for r in rows if _alive(r["pid"], r["pid_started"])), None)


def _claim(store: Store, job_id: int) -> Any:
    """Mark the job running (in one write transaction with the device check); None while it must wait,
    "cancelled" when a cancel was asked for before it could start."""
    with store.transaction() as conn:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job with id {job_id}")
        if row["state"] != "queued":  # e.g. cancelled between its process's start and its first step
            raise BadInput(f"job {job_id} is {row['state']}; only a queued job starts (resume it to run it again)")
        me = psutil.Process(os.getpgrp())  # the supervisor, whose group holds every process of the job
        if row["pid"] is not None and row["pid"] != me.pid:  # e.g. a process left from a rolled-back submit
            raise BadInput(f"job {job_id} was started by process {row['pid']}, not by this one")
        if row["cancel_requested_at"] is not None:
            conn.execute(
                "UPDATE jobs SET state = 'cancelled', message = 'cancelled before it started', finished_at = ?"
                " WHERE id = ?",
                (now(), job_id),
            )
            return "cancelled"
        holder = device_holder(store, job_id, row["kind"])
        if holder is not None:
            conn.execute(
                "UPDATE jobs SET state = 'queued', message = ?, heartbeat_at = ? WHERE id = ?",
                (f"waiting for job {holder} to finish: one training job at a time on this device", now(), job_id),
            )
            return None
        conn.execute(
            "UPDATE jobs SET state = 'running', pid = ?, pid_started = ?, attempts = attempts + 1,"
            " started_at = COALESCE(started_at, ?), heartbeat_at = ?, finished_at = NULL, error = '' WHERE id = ?",
            (me.pid, me.create_time(), now(), now(), job_id),
        )
    return row


def supervise(job_id: int) -> int:
    """Body of `python -m workbench run-job ID`: run the job in a worker process, report how it ended.

    SIGTERM (cancel's escalation, sent to the whole group) is meant for the worker; the
    supervisor waits for it, so that it can tell a signal death from a job that ended itself.
    """
    log = workspace.jobs_dir() / f"{job_id}.log"
    start = processes.log_size(log)
    worker = subprocess.Popen(
        [sys.executable, "-m", "workbench", "run-job", str(job_id), "--worker"], cwd=PROJECT_ROOT
    )  # stdout and stderr are the supervisor's: the job's log file
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = worker.wait()
    with Store() as store:
        row = store.one("SELECT state, pid FROM jobs WHERE id = ?", (job_id,))
        if row is not None and row["state"] == "running" and row["pid"] == os.getpid():
            _record_worker_death(store, job_id, code, processes.last_words(log, start))
    for pid in processes.group_members(os.getpgrp()):  # ranks or search workers the worker left behind
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return 0 if code == 0 else 1


def _record_worker_death(store: Store, job_id: int, code: int, tail: list[str]) -> None:
    """The worker ended without recording how (killed, crashed): say so, with what it last wrote."""
    reason = processes.exit_reason(code)
    message = f"the job's process died of {reason}; resume to continue where it stopped"
    for line in tail:
        store.execute("INSERT INTO job_log (job_id, at, line) VALUES (?, ?, ?)", (job_id, now(), line[:2000]))
    store.execute(
        "UPDATE jobs SET state = 'failed', message = ?, error = ?, finished_at = ? WHERE id = ? AND state = 'running'",
        (message, f"{reason}: {tail[-1]}" if tail else reason, now(), job_id),
    )


def cancel_on_sigterm() -> None:
    """Make SIGTERM (a cancel's escalation) a JobCancelled raised where Python can see it."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(JobCancelled()))


@contextlib.contextmanager
def sigterm_held() -> Iterator[threading.Event]:
    """Hold SIGTERM while the block runs (training steps, a checkpoint being written): one that arrives is noted.

    The block polls the event it is given where it can stop cleanly; once it has ended, however it ends,
    a held SIGTERM goes to the handler that was in place before (cancel_on_sigterm's raises JobCancelled).
    Signals reach the main thread only, so elsewhere this holds nothing.
    """
    received = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: received.set())
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if received.is_set():
            signal.raise_signal(signal.SIGTERM)


def run(job_id: int) -> str:
    """Body of the worker (`run-job ID --worker`): wait for the device if need be, claim the job, run it."""
    import faulthandler

    faulthandler.enable()  # a native crash leaves the Python stack in the job's log
    store = Store()
    while (row := _claim(store, job_id)) is None:
        time.sleep(HEARTBEAT_SECONDS)
    if row == "cancelled":  # asked to stop before it started, or while it waited for the device
        return "cancelled"
    ctx = JobContext(store, job_id, json.loads(row["params"]))
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(job_id, stop), daemon=True)
    beat.start()
    cancel_on_sigterm()
    state, message, error = "done", "finished", ""
    try:
        ctx.log(f"started (attempt {row['attempts'] + 1})")
        _load_kind(row["kind"])(ctx)
        last = store.one_or_raise("SELECT message FROM jobs WHERE id = ?", (job_id,), f"no job with id {job_id}")
        # A job's own summary beats "finished".
        message = last["message"] if last["message"].startswith("done") else message
    except JobCancelled:
        state, message = "cancelled", "cancelled by the user"
    except JobPaused as exc:
        state, message, error = "interrupted", str(exc), str(exc)
    except WorkbenchError as exc:
        state, message, error = "failed", str(exc), str(exc)
    except Exception as exc:  # a bug: keep the traceback in the log, one line for the user
        traceback.print_exc()
        state, error = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
        message = error
        ctx.log(traceback.format_exc())
    finally:
        stop.set()
    ctx.log(f"{state}: {message}")
    # Only this attempt's own row: a worker that ends late never overwrites a newer attempt's state.
    store.execute(
        "UPDATE jobs SET state = ?, message = ?, error = ?, finished_at = ? WHERE id = ? AND attempts = ?",
        (state, message, error, now(), job_id, row["attempts"] + 1),
    )
    store.close()
    return state
