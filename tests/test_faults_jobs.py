"""Jobs under faults: a dead leader, a cancel during a long step, a job that stops reporting, a cancel before start."""

import os
import signal
import sqlite3
import subprocess
import threading
import time

import psutil
import pytest

from core import jobs, processes
from core.store import Store, now
from tests.conftest import wait_until
from tests.test_jobs import echo_run


def echo_job(store, delay: float, start: bool = True) -> tuple[int, int]:
    run_id = echo_run(store, delay)
    return run_id, jobs.submit(store, "generate", {"run_id": run_id}, start=start)


def generations(store, run_id: int) -> int:
    return store.one("SELECT COUNT(*) FROM generations WHERE run_id = ?", (run_id,))[0]


def worker_of(job) -> psutil.Process:
    return next(p for p in psutil.Process(job.pid).children() if "--worker" in p.cmdline())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_job_whose_leader_died_has_the_rest_of_its_group_ended(starter):
    """The leader is gone but its children run on (ranks, search workers): reconcile ends them by the group id."""
    group = subprocess.Popen(["bash", "-c", "sleep 300 & wait"], start_new_session=True)
    orphan = wait_until(lambda: psutil.Process(group.pid).children())[0]
    job_id = starter.execute(
        "INSERT INTO jobs (kind, params, state, pid, pid_started, created_at, started_at, heartbeat_at)"
        " VALUES ('generate', '{}', 'running', ?, ?, ?, ?, ?)",
        (group.pid, psutil.Process(group.pid).create_time(), now(), now(), now()),
    ).lastrowid
    group.kill()
    group.wait()
    assert orphan.is_running() and os.getpgid(orphan.pid) == group.pid

    assert jobs.get(starter, job_id).state == "interrupted"
    wait_until(lambda: gone(orphan.pid), timeout=5)


def test_a_killed_supervisor_takes_its_worker_with_it_and_resume_runs_one_attempt(starter):
    run_id, job_id = echo_job(starter, 0.15)
    job = wait_until(lambda: (j := jobs.get(starter, job_id)).done >= 2 and j)
    worker = worker_of(job)
    os.kill(job.pid, signal.SIGKILL)  # the leader only: the worker is orphaned
    wait_until(lambda: jobs.get(starter, job_id).state == "interrupted", timeout=10)
    wait_until(lambda: gone(worker.pid), timeout=5)
    jobs.resume(starter, job_id)
    job = jobs.wait(starter, job_id, timeout=90)
    assert job.state == "done" and generations(starter, run_id) == job.total


def test_a_cancel_during_a_long_step_lets_the_step_finish_and_keeps_it(starter):
    """One item takes 8 s (longer than any fixed grace): the job keeps beating, so it is never forced."""
    run_id, job_id = echo_job(starter, 8.0)
    wait_until(lambda: jobs.get(starter, job_id).state == "running")
    time.sleep(0.5)  # inside the first item
    jobs.request_cancel(starter, job_id)
    slowest = 0.0
    while (job := jobs.get(starter, job_id)).state in jobs.ACTIVE:  # read as the page's fragment reads it
        started = time.monotonic()
        jobs.reconcile(starter)
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.5)
    assert job.state == "cancelled"
    assert generations(starter, run_id) == job.done == 1  # the step in progress was finished and committed
    assert slowest < 0.5  # no reader waits on a cancel


def test_a_job_that_stops_reporting_shows_not_responding_and_a_cancel_forces_it(starter, monkeypatch):
    monkeypatch.setattr(jobs, "HEARTBEAT_STALE_SECONDS", 1.0)
    monkeypatch.setattr(jobs, "CANCEL_GRACE_SECONDS", 1.0)
    run_id, job_id = echo_job(starter, 0.2)
    job = wait_until(lambda: (j := jobs.get(starter, job_id)).done >= 1 and j)
    assert job.responding
    os.kill(worker_of(job).pid, signal.SIGSTOP)  # hung: alive, but silent
    job = wait_until(lambda: not (j := jobs.get(starter, job_id)).responding and j, timeout=10)
    assert job.state == "running" and job.silent_for >= 1.0

    jobs.request_cancel(starter, job_id)
    job = wait_until(lambda: (j := jobs.get(starter, job_id)).state not in jobs.ACTIVE and j, timeout=20)
    assert job.state == "cancelled" and job.resumable
    kept = generations(starter, run_id)
    jobs.resume(starter, job_id)
    job = jobs.wait(starter, job_id, timeout=90)
    assert job.state == "done" and generations(starter, run_id) == job.total >= kept


def test_a_job_that_is_not_responding_can_be_killed_and_resumed(starter, monkeypatch):
    monkeypatch.setattr(jobs, "HEARTBEAT_STALE_SECONDS", 1.0)
    run_id, job_id = echo_job(starter, 0.2)
    job = wait_until(lambda: (j := jobs.get(starter, job_id)).done >= 1 and j)
    os.kill(worker_of(job).pid, signal.SIGSTOP)
    wait_until(lambda: not jobs.get(starter, job_id).responding, timeout=10)
    job = jobs.kill(starter, job_id)
    assert job.state == "cancelled"
    wait_until(lambda: not processes.group_members(job.pid), timeout=5)
    jobs.resume(starter, job_id)
    assert jobs.wait(starter, job_id, timeout=90).state == "done"
    assert generations(starter, run_id) == jobs.get(starter, job_id).total


def test_the_heartbeat_survives_a_store_error(starter, monkeypatch):
    _, job_id = echo_job(starter, 0.0, start=False)
    failures = iter([sqlite3.OperationalError("database is locked")] * 2)
    real_execute = Store.execute

    def flaky_execute(self, sql, args=()):
        if sql.startswith("UPDATE jobs SET heartbeat_at") and (error := next(failures, None)):
            raise error
        return real_execute(self, sql, args)

    monkeypatch.setattr(Store, "execute", flaky_execute)
    monkeypatch.setattr(jobs, "HEARTBEAT_SECONDS", 0.05)
    stop = threading.Event()
    beat = threading.Thread(target=jobs._heartbeat, args=(job_id, stop))
    beat.start()
    try:
        wait_until(lambda: starter.one("SELECT heartbeat_at FROM jobs WHERE id = ?", (job_id,))[0], timeout=5)
    finally:
        stop.set()
        beat.join()


@pytest.mark.parametrize("when", ["before its process recorded itself", "after"])
def test_a_job_cancelled_before_it_started_never_runs(starter, when):
    run_id, job_id = echo_job(starter, 0.0, start=False)
    if when == "after":
        starter.execute("UPDATE jobs SET pid = 1 WHERE id = ?", (job_id,))  # recorded, so the cancel only asks
    jobs.request_cancel(starter, job_id)
    proc = jobs.spawn(starter, job_id)
    proc.wait(timeout=60)
    job = jobs.get(starter, job_id)
    assert job.state == "cancelled" and job.attempts == 0 and job.started_at is None
    assert generations(starter, run_id) == 0
