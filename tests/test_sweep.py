"""Decoding sweeps: grids, one run per configuration, answers generated and scored exactly once."""

import os
import signal

import pytest

from core import jobs, scoring, sweep
from core.decoding import DecodingParams
from core.errors import BadInput
from core.sweep import SweepConfig, expand, parse_grid
from tests.conftest import run_cli, wait_until


def config(**overrides) -> SweepConfig:
    values = {"dataset": "starter", "grid": {"temperature": [0.0, 0.7]}, "backend": "echo", "part": "test", "limit": 4}
    return SweepConfig(**{**values, **overrides})


def test_a_grid_is_parsed_from_the_cli_text():
    assert parse_grid("temperature=0,0.7 top_p=0.7 max_tokens=30 repeat_penalty=1.1") == {
        "temperature": [0.0, 0.7],
        "top_p": [0.7],
        "max_tokens": [30],
        "repeat_penalty": [1.1],
    }
    for bad in ("temperature", "temperature=hot", "max_tokens=1.5"):
        with pytest.raises(BadInput):
            parse_grid(bad)


def test_product_and_one_at_a_time_grids_expand_without_duplicates():
    grid = {"temperature": [0.0, 0.7], "top_p": [0.7, 0.9]}
    base = DecodingParams(temperature=0.7, top_p=0.9)
    assert len(expand(config(grid=grid, baseline=base))) == 4
    one = expand(config(grid=grid, baseline=base, mode="one-at-a-time"))
    assert [(p.temperature, p.top_p) for p in one] == [(0.0, 0.9), (0.7, 0.9), (0.7, 0.7)]


def test_bad_sweeps_are_refused_before_anything_is_written(starter):
    for overrides, message in (
        ({"grid": {"temperature": [5.0]}}, "temperature"),
        ({"grid": {"stop": [1]}}, "sweep"),
        ({"mode": "random"}, "mode"),
        ({"repeats": 0}, "repeats"),
    ):
        with pytest.raises(BadInput, match=message):
            config(**overrides)
    from core import dataset, formats

    dataset.add_pairs(starter, "fresh", [formats.PairRow("What is a baseline?", "A reference point.")], "accepted")
    with pytest.raises(BadInput, match="no split"):
        sweep.create_sweep(starter, config(dataset="fresh"))
    assert starter.query("SELECT * FROM sweeps") == [] and starter.query("SELECT * FROM runs") == []


def test_each_configuration_becomes_a_scored_run_stamped_for_reproduction(starter):
    sweep_id, job_id = sweep.start_sweep(starter, config(repeats=2, baseline=DecodingParams(seed=3)))
    job = jobs.wait(starter, job_id, timeout=120)
    assert job.state == "done", job.message
    members = sweep.sweep_runs(starter, sweep_id)
    assert [r.params.temperature for r in members] == [0.0, 0.7]
    for run in members:
        assert run.kind == "sweep" and run.split_version == 1 and run.scorer.startswith("all-MiniLM-L6-v2_L6")
        assert run.params.seed == 3 and run.prompt_template and run.config["repeats"] == 2
        scores = scoring.run_scores(starter, run.id, run.scorer)
        assert len(scores) == 8 and scores["f1"].between(0, 1).all()
    table = sweep.sweep_table(starter, sweep_id)
    assert table["best"].sum() == 1 and table.iloc[0]["mean_f1"] >= table.iloc[1]["mean_f1"]
    assert (table["ci_low"] <= table["mean_f1"]).all() and (table["mean_f1"] <= table["ci_high"]).all()


def test_a_sweep_killed_with_sigkill_resumes_with_every_item_generated_and_scored_once(starter):
    slow = config(limit=6, repeats=2, backend_options={"delay": 0.2}, grid={"temperature": [0.0, 0.5, 1.0]})
    sweep_id, job_id = sweep.start_sweep(starter, slow)
    job = wait_until(lambda: (j := jobs.get(starter, job_id)).done >= 7 and j)
    os.kill(job.pid, signal.SIGKILL)
    wait_until(lambda: jobs.get(starter, job_id).state == "interrupted", timeout=15)
    jobs.resume(starter, job_id)
    job = jobs.wait(starter, job_id, timeout=180)
    assert job.state == "done" and job.done == job.total == 3 * 6 * 2
    run_ids = [r.id for r in sweep.sweep_runs(starter, sweep_id)]
    marks = ",".join("?" * len(run_ids))
    generated = starter.query(
        f"SELECT run_id, pair_id, repeat, COUNT(*) AS n FROM generations WHERE run_id IN ({marks}) GROUP BY 1, 2, 3",
        tuple(run_ids),
    )
    scored = starter.query(
        f"SELECT g.id, COUNT(s.id) AS n FROM generations g LEFT JOIN scores s "
        f"ON s.generation_id = g.id WHERE g.run_id IN ({marks}) GROUP BY g.id",
        tuple(run_ids),
    )
    assert len(generated) == 36 and {r["n"] for r in generated} == {1}
    assert len(scored) == 36 and {r["n"] for r in scored} == {1}


def test_an_ollama_sweep_pauses_when_the_server_vanishes_and_finishes_after_resume(starter):
    from tests.ollama_standin import OllamaStandin

    server = OllamaStandin(delay=0.1).start()
    try:
        params = DecodingParams(temperature=0.3, top_p=0.8, top_k=12, max_tokens=20, repeat_penalty=1.2, seed=9)
        cfg = config(
            backend="ollama",
            model="standin-tiny",
            baseline=params,
            grid={"top_p": [0.5, 0.8]},
            limit=5,
            backend_options={"host": server.url, "timeout": 5.0},
        )
        sweep_id, job_id = sweep.start_sweep(starter, cfg)
        wait_until(lambda: jobs.get(starter, job_id).done >= 3)
        server.stop()
        job = jobs.wait(starter, job_id, timeout=60)
        assert job.state == "interrupted" and "Ollama" in job.message
        kept = starter.one("SELECT COUNT(*) FROM generations")[0]
        assert kept >= 3
        server.start()
        jobs.resume(starter, job_id)
        assert jobs.wait(starter, job_id, timeout=60).state == "done"
        sent = [r.options for r in server.requests if r.path == "/api/generate"]
        assert {o["top_p"] for o in sent} == {0.5, 0.8}
        assert all(
            o["temperature"] == 0.3
            and o["top_k"] == 12
            and o["num_predict"] == 20
            and o["repeat_penalty"] == 1.2
            and o["seed"] == 9
            for o in sent
        )
    finally:
        server.stop()


def test_an_optuna_search_keeps_its_study_in_the_store_and_runs_each_trial_as_a_run(starter):
    import optuna

    cfg = config(mode="optuna", trials=3, grid={"temperature": [0.0, 1.0], "max_tokens": [4, 40]})
    sweep_id, job_id = sweep.start_sweep(starter, cfg)
    assert jobs.wait(starter, job_id, timeout=180).state == "done"
    study = optuna.load_study(study_name=f"sweep-{sweep_id}", storage=sweep.optuna_storage(starter))
    assert len(study.trials) == 3
    assert len(sweep.sweep_runs(starter, sweep_id)) <= 3
    assert study.best_trial.user_attrs["run_id"] in [r.id for r in sweep.sweep_runs(starter, sweep_id)]


SWEEP_ARGS = (
    "sweep",
    "--dataset",
    "starter",
    "--split",
    "test",
    "--limit",
    "5",
    "--grid",
    "temperature=0,0.7 top_p=0.7",
)


@pytest.mark.slow
def test_cli_sweep_on_the_embedded_model_prints_two_scored_runs(embedded_models):
    result = run_cli(*SWEEP_ARGS, timeout=600)  # the starter arrives split 80/20
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    assert "mean_f1" in result.stdout and "95% CI" in result.stdout and "median_f1" in result.stdout
    listed = run_cli("runs", "--json")
    rows = __import__("json").loads(listed.stdout)
    assert len(rows) == 2 and all(r["n"] == 5 and r["mean_f1"] is not None for r in rows)
    assert {r["params"].split()[0] for r in rows} == {"temperature=0.0", "temperature=0.7"}
