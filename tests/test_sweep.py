"""Decoding sweeps: grids, one run per configuration, answers generated and scored exactly once; the best
chosen on the validation questions and confirmed once on test."""

import os
import signal

import pytest

from core import dataset, jobs, runs, scoring, sweep
from core.decoding import DecodingParams
from core.errors import BadInput
from core.store import Store, now
from core.sweep import SweepConfig, expand, parse_grid
from tests.conftest import run_cli, wait_until

STAMP = scoring.scorer_stamp(scoring.ScorerConfig())


def config(**overrides) -> SweepConfig:
    values = {"dataset": "starter", "grid": {"temperature": [0.0, 0.7]}, "backend": "echo", "limit": 4}
    return SweepConfig(**{**values, **overrides})


def store_scores(store: Store, run_id: int, f1s: dict[int, float | tuple[float, ...]], scorer: str = STAMP) -> None:
    """Answers of a run to the given pairs (pair id -> F1, or a tuple: one per repeat), scored with that F1.

    Precision, recall and ROUGE-L are set to the F1 too; the answer text names the run, pair and repeat.
    """
    with store.transaction() as conn:
        for pair_id, values in f1s.items():
            for repeat, f1 in enumerate(values if isinstance(values, tuple) else (values,)):
                generation = conn.execute(
                    "INSERT INTO generations (run_id, pair_id, repeat, answer, created_at) VALUES (?, ?, ?, ?, ?)",
                    (run_id, pair_id, repeat, f"run {run_id} pair {pair_id} repeat {repeat}", now()),
                ).lastrowid
                conn.execute(
                    "INSERT INTO scores (generation_id, scorer, precision, recall, f1, f1_rescaled, rouge_l,"
                    " created_at) VALUES (?, ?, ?, ?, ?, NULL, ?, ?)",
                    (generation, scorer, f1, f1, f1, f1, now()),
                )


def part_of(store: Store, split_id: int) -> dict[int, str]:
    return {p.id: part for part in dataset.PARTS for p in dataset.select_pairs(store, "starter", part, "all", split_id)}


def scored_sweep(store: Store, f1s: list[dict[str, float]], **overrides) -> int:
    """A sweep (no job) of one temperature per entry of `f1s`; each configuration's answers score the F1 its
    entry gives the question's part (train, validation, test)."""
    temperatures = [0.0, 0.7, 1.0, 1.3][: len(f1s)]
    values = {"grid": {"temperature": temperatures}, "part": "all", "limit": None, **overrides}
    sweep_id = sweep.create_sweep(store, config(**values))
    parts = part_of(store, sweep.get_sweep(store, sweep_id).split_id)
    for run, by_part in zip(sweep.sweep_runs(store, sweep_id), f1s):
        store_scores(store, run.id, {p.id: by_part[parts[p.id]] for p in runs.run_pairs(store, run)})
    return sweep_id


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


# ---- choosing on validation, confirming on test --------------------------------------------------

# Two configurations that disagree: A is better on the validation questions, B on the test questions.
A = {"train": 0.5, "validation": 0.8, "test": 0.4}
B = {"train": 0.5, "validation": 0.6, "test": 0.9}


def test_the_best_is_the_configuration_best_on_validation_even_where_test_and_the_mean_disagree(starter):
    sweep_id = scored_sweep(starter, [A, B])  # part all: every question, scored by the part it is in
    a, b = (r.id for r in sweep.sweep_runs(starter, sweep_id))
    table = sweep.sweep_table(starter, sweep_id)
    rows = table.set_index("run")
    assert rows.loc[a, "validation_f1"] == pytest.approx(0.8) and rows.loc[b, "test_f1"] == pytest.approx(0.9)
    assert rows.loc[b, "mean_f1"] > rows.loc[a, "mean_f1"]  # B wins on test and over all questions,
    assert table["run"].tolist() == [a, b] and table["best"].tolist() == [True, False]  # A on validation: best
    choice = sweep.choose(starter, sweep_id)
    assert (choice.part, choice.best, len(choice.pair_ids)) == ("validation", a, 11)
    assert "11 validation questions" in choice.describe()


def test_a_sweep_of_the_test_part_chooses_on_the_questions_it_is_scored_on_and_says_so(starter):
    sweep_id = scored_sweep(starter, [A, B], part="test")
    b = sweep.sweep_runs(starter, sweep_id)[1].id
    table = sweep.sweep_table(starter, sweep_id)
    assert "validation_f1" not in table and "test_f1" not in table  # one part: its mean is mean_f1
    assert table.iloc[0]["run"] == b and table.iloc[0]["best"]
    choice = sweep.choose(starter, sweep_id)
    assert choice.part == "test" and "optimistic" in choice.describe()
    with pytest.raises(BadInput, match="chose its best on test questions"):
        sweep.confirm_best(starter, sweep_id)  # a test run would be scored on the questions it was chosen on


def test_on_a_split_without_validation_only_a_sweep_of_the_test_part_by_name_is_made(starter):
    split = dataset.make_split(starter, "starter", validation_size=0)
    for part in ("validation", "all"):  # both would choose the best on test questions without saying so
        with pytest.raises(BadInput) as refused:
            sweep.create_sweep(starter, config(part=part))
        assert str(refused.value) == dataset.no_validation_message(split)
    assert starter.query("SELECT * FROM sweeps") == []
    sweep_id = sweep.create_sweep(starter, config(part="test"))
    assert sweep.get_sweep(starter, sweep_id).split_id == split.id


def test_the_optuna_objective_is_the_mean_f1_on_the_validation_questions_only(starter):
    import optuna

    # A space of one point: every trial asks temperature 0.5, on the run scored here beforehand, so the job
    # generates nothing and each trial's value comes from these scores.
    cfg = config(mode="optuna", trials=2, part="all", limit=None, grid={"temperature": [0.5, 0.5]})
    sweep_id = sweep.create_sweep(starter, cfg)
    made = sweep.get_sweep(starter, sweep_id)
    run = sweep._add_or_find(starter, made, DecodingParams(temperature=0.5), sweep._frozen(starter, made))
    parts = part_of(starter, made.split_id)
    by_part = {"train": 0.9, "validation": 0.3, "test": 0.9}
    store_scores(starter, run.id, {p.id: by_part[parts[p.id]] for p in runs.run_pairs(starter, run)})
    job_id = jobs.submit(starter, "sweep", {"sweep_id": sweep_id}, start=False)
    sweep.run_sweep_job(jobs.JobContext(starter, job_id, {"sweep_id": sweep_id}))
    study = optuna.load_study(study_name=f"sweep-{sweep_id}", storage=sweep.optuna_storage(starter))
    assert [t.value for t in study.trials] == pytest.approx([0.3, 0.3])


def test_confirm_best_runs_the_best_once_on_the_test_part_of_the_sweeps_split_with_its_selection(starter):
    with pytest.raises(BadInput, match="no scored answers"):
        sweep.confirm_best(starter, sweep.create_sweep(starter, config()))
    sweep_id = scored_sweep(starter, [A, B])
    made = sweep.get_sweep(starter, sweep_id)
    best = sweep.sweep_runs(starter, sweep_id)[0]  # A, the best on validation
    dataset.make_split(starter, "starter", seed=7)  # a newer split: the confirmation stays on the sweep's

    run_id, job_id = sweep.confirm_best(starter, sweep_id)
    assert sweep.confirm_best(starter, sweep_id) == (run_id, job_id)  # asked again: the same confirmation
    run = runs.get_run(starter, run_id)
    assert (run.part, run.split_id, run.params, run.scorer) == ("test", made.split_id, best.params, best.scorer)
    test_ids = [p.id for p in dataset.select_pairs(starter, "starter", "test", split_id=made.split_id)]
    assert [p.id for p in runs.run_pairs(starter, run)] == test_ids
    assert run.selection == {
        "how": f"best of 2 configurations of sweep {sweep_id} by mean F1 on validation",
        "candidates": 2,
        "split_id": made.split_id,
        "part": "validation",
        "pair_ids": list(sweep.choose(starter, sweep_id).pair_ids),
    }
    assert jobs.wait(starter, job_id, timeout=180).state == "done"
    scores = scoring.run_scores(starter, run_id, run.scorer)
    assert len(scores) == len(test_ids) and scores["f1"].notna().all()
    confirming = sweep.get_sweep(starter, run.sweep_id)
    assert confirming.config.confirms == sweep_id
    assert [r.id for r in sweep.sweep_runs(starter, confirming.id)] == [run_id]
    with pytest.raises(BadInput, match="confirm that sweep"):
        sweep.confirm_best(starter, confirming.id)
    assert len(jobs.list_jobs(starter, kind="sweep")) == 1


SWEEP_ARGS = (
    "sweep",
    "--dataset",
    "starter",
    "--split",
    "validation",
    "--limit",
    "5",
    "--grid",
    "temperature=0,0.7 top_p=0.7",
)


@pytest.mark.slow
def test_cli_sweep_on_the_embedded_model_prints_two_scored_runs(embedded_models):
    result = run_cli(*SWEEP_ARGS, timeout=600)  # the starter arrives split 70/10/20
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    assert "mean_f1" in result.stdout and "95% CI" in result.stdout and "median_f1" in result.stdout
    listed = run_cli("runs", "--json")
    rows = __import__("json").loads(listed.stdout)
    assert len(rows) == 2 and all(r["n"] == 5 and r["mean_f1"] is not None for r in rows)
    assert {r["params"].split()[0] for r in rows} == {"temperature=0.0", "temperature=0.7"}
