"""Background jobs: their own process, progress in the store, cancel, interrupted-on-death, resume."""

import json
import os
import signal

import psutil
import pytest

from core import jobs, processes, runs
from core.decoding import DecodingParams
from core.errors import BadInput
from tests.conftest import run_cli, wait_until


def echo_run(store, delay: float, **spec) -> int:
    return runs.create_run(
        store,
        runs.RunSpec(
            dataset="starter",
            backend="echo",
            part="test",
            backend_options={"delay": delay},
            params=DecodingParams(max_tokens=12),
            **spec,
        ),
    )


def test_a_job_runs_in_its_own_process_group_and_reports_progress(starter):
    run_id = echo_run(starter, 0.0)
    job_id = jobs.submit(starter, "generate", {"run_id": run_id})
    job = jobs.wait(starter, job_id, timeout=60)
    assert job.state == "done", job.message
    n_test = runs.get_run(starter, run_id)
    assert job.done == job.total == len(runs.run_pairs(starter, n_test))
    assert any("done" in line for line in jobs.log_tail(starter, job_id))


def test_a_killed_job_shows_interrupted_and_resumes_exactly_once(starter):
    run_id = echo_run(starter, 0.15, repeats=2)
    job_id = jobs.submit(starter, "generate", {"run_id": run_id})
    job = wait_until(lambda: (j := jobs.get(starter, job_id)).done >= 5 and j)
    assert os.getpgid(job.pid) == job.pid  # its own process group
    os.kill(job.pid, signal.SIGKILL)
    job = wait_until(lambda: (j := jobs.get(starter, job_id)).state != "running" and j, timeout=10)
    assert job.state == "interrupted" and job.resumable
    committed = starter.one("SELECT COUNT(*) FROM generations WHERE run_id = ?", (run_id,))[0]
    assert 0 < committed < job.total

    jobs.resume(starter, job_id)
    job = jobs.wait(starter, job_id, timeout=90)
    assert job.state == "done" and job.attempts == 2
    rows = starter.query(
        "SELECT pair_id, repeat, COUNT(*) AS n FROM generations WHERE run_id = ? GROUP BY 1, 2", (run_id,)
    )
    assert len(rows) == job.total and all(r["n"] == 1 for r in rows)


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
def test_a_job_whose_process_dies_of_a_signal_is_failed_with_the_signal_and_its_last_lines(starter, sig):
    run_id = echo_run(starter, 0.15)
    job_id = jobs.submit(starter, "generate", {"run_id": run_id})
    job = wait_until(lambda: (j := jobs.get(starter, job_id)).done >= 2 and j)
    worker = psutil.Process(job.pid).children()[0]  # the supervisor (job.pid) runs the job in a worker
    assert "--worker" in worker.cmdline() and os.getpgid(worker.pid) == job.pid
    os.kill(worker.pid, sig)
    job = wait_until(lambda: (j := jobs.get(starter, job_id)).state != "running" and j, timeout=15)
    assert job.state == "failed" and job.resumable
    assert f"died of {sig.name} (signal {int(sig)})" in job.message
    log = "\n".join(jobs.log_tail(starter, job_id))
    if sig == signal.SIGSEGV:  # the worker's own last words, from its log file
        assert "Fatal Python error: Segmentation fault" in log
    wait_until(lambda: not processes.group_members(job.pid), timeout=10)  # the supervisor exits, nothing is left

    jobs.resume(starter, job_id)
    job = jobs.wait(starter, job_id, timeout=90)
    assert job.state == "done" and job.attempts == 2
    counts = starter.query("SELECT COUNT(*) AS n FROM generations WHERE run_id = ? GROUP BY pair_id, repeat", (run_id,))
    assert len(counts) == job.total and {r["n"] for r in counts} == {1}


def test_cancel_stops_a_job_between_items(starter):
    job_id = jobs.submit(starter, "generate", {"run_id": echo_run(starter, 0.3)})
    wait_until(lambda: jobs.get(starter, job_id).done >= 1)
    job = jobs.cancel(starter, job_id)
    assert job.state == "cancelled"
    assert job.done < job.total
    with pytest.raises(BadInput):
        jobs.cancel(starter, job_id)


def test_a_failing_job_records_a_one_line_reason(starter):
    run_id = runs.create_run(
        starter,
        runs.RunSpec(dataset="starter", backend="ollama", model="nope", backend_options={"host": "http://127.0.0.1:9"}),
    )
    job = jobs.wait(starter, jobs.submit(starter, "generate", {"run_id": run_id}), timeout=60)
    # An unreachable server pauses the job (resumable) instead of failing it.
    assert job.state == "interrupted" and "not reachable" in job.message
    assert "\n" not in job.message


def test_only_stopped_jobs_resume_and_unknown_kinds_are_refused(starter):
    job_id = jobs.submit(starter, "generate", {"run_id": echo_run(starter, 0.0)})
    jobs.wait(starter, job_id, timeout=60)
    with pytest.raises(BadInput, match="done"):
        jobs.resume(starter, job_id)
    with pytest.raises(BadInput):
        jobs.submit(starter, "no-such-kind", {})


def test_jobs_started_elsewhere_show_in_the_cli(starter):
    job_id = jobs.submit(starter, "generate", {"run_id": echo_run(starter, 0.0)})
    jobs.wait(starter, job_id, timeout=60)
    listed = json.loads(run_cli("jobs", "--json").stdout)
    assert listed[0]["id"] == job_id and listed[0]["state"] == "done"


def test_an_ollama_run_pauses_when_the_server_vanishes_and_resumes_exactly_once(starter):
    from tests.ollama_standin import OllamaStandin

    server = OllamaStandin(delay=0.2).start()
    try:
        run_id = runs.create_run(
            starter,
            runs.RunSpec(
                dataset="starter",
                backend="ollama",
                model="standin-tiny",
                backend_options={"host": server.url, "timeout": 5.0},
            ),
        )
        job_id = jobs.submit(starter, "generate", {"run_id": run_id})
        wait_until(lambda: jobs.get(starter, job_id).done >= 3)
        server.stop()
        job = jobs.wait(starter, job_id, timeout=30)
        assert job.state == "interrupted" and ("not reachable" in job.message or "connection" in job.message)
        server.start()
        jobs.resume(starter, job_id)
        job = jobs.wait(starter, job_id, timeout=60)
        assert job.state == "done"
        counts = starter.query("SELECT COUNT(*) AS n FROM generations WHERE run_id = ? GROUP BY pair_id", (run_id,))
        assert len(counts) == job.total and {r["n"] for r in counts} == {1}
        options = [r.options for r in server.requests if r.path == "/api/generate"]
        assert all(o["num_predict"] == 128 and o["temperature"] == 0.7 for o in options)
    finally:
        server.stop()


def test_a_run_keeps_the_questions_it_was_created_with(starter):
    run_id = echo_run(starter, 0.0, limit=3)
    asked = [p.id for p in runs.run_pairs(starter, runs.get_run(starter, run_id))]
    from core import dataset

    dataset.set_status(starter, asked[0], "rejected")
    assert [p.id for p in runs.run_pairs(starter, runs.get_run(starter, run_id))] == asked


def test_a_job_whose_process_never_started_can_be_cancelled_at_once(starter):
    job_id = jobs.submit(starter, "generate", {"run_id": echo_run(starter, 0.0)}, start=False)
    assert jobs.request_cancel(starter, job_id).state == "cancelled"
