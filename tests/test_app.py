"""The app's pages under Streamlit's AppTest: each renders without an exception and acts on its widgets."""

import os
import signal
import threading
import time

import pytest
from streamlit.testing.v1 import AppTest

from core import dataset, intake, jobs, runs, sweep
from core.engine_process import engine_log
from core.store import Store
from tests.test_sweep import A, B, scored_sweep

PAGES = [
    "../pages/overview.py",
    "../pages/dataset.py",
    "../pages/jobs.py",
    "../pages/settings.py",
    "../pages/playground.py",
    "../pages/sweep.py",
    "../pages/training.py",
    "../pages/compare.py",
]


@pytest.fixture
def app(workbench_home):
    return AppTest.from_file("../workbench/app.py", default_timeout=60)


def open_page(app: AppTest, page: str) -> AppTest:
    app.switch_page(page).run()
    assert not app.exception, app.exception
    return app


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_an_error(app, page):
    open_page(app, page)
    assert app.title and not app.error


def test_the_overview_lists_the_starter_dataset(app):
    open_page(app, PAGES[0])
    frame = app.dataframe[0].value
    assert frame.loc[0, "dataset"] == "starter" and frame.loc[0, "accepted"] >= 100


def test_the_dataset_page_draws_a_split_and_offers_exports(app):
    open_page(app, PAGES[1])
    assert [m.label for m in app.metric] == ["Pending", "Accepted", "Rejected", "Split"]
    next(b for b in app.button if b.label == "Draw a new split").click().run()
    assert not app.exception
    assert any("split v2" in s.value for s in app.success)  # v1 came with the starter dataset
    with Store() as store:
        assert dataset.latest_split(store, "starter").version == 2


def test_the_dataset_page_filters_by_text(app):
    open_page(app, PAGES[1])
    app.text_input[0].input("baseline").run()
    shown = app.dataframe[0].value
    assert 0 < len(shown) < 100
    assert shown.apply(lambda r: "baseline" in (r["question"] + r["answer"]).lower(), axis=1).all()


def test_the_jobs_page_shows_a_job_with_its_log(app):
    with Store() as store:
        intake.ensure_starter(store)
        dataset.make_split(store, "starter")
        run_id = runs.create_run(store, runs.RunSpec(dataset="starter", backend="echo", limit=3))
        job_id = jobs.submit(store, "generate", {"run_id": run_id})
        jobs.wait(store, job_id, timeout=60)
    open_page(app, PAGES[2])
    assert app.dataframe[0].value.loc[0, "state"] == "done"
    assert any("done" in c.value for c in app.code)


def test_settings_refuse_a_bad_value_with_a_banner_and_keep_the_old_one(app):
    open_page(app, PAGES[3])
    gguf_box = next(t for t in app.text_input if t.key == "settings-generator_gguf")
    gguf_box.input("/no/such/model.gguf")
    next(b for b in app.button if b.label == "Save settings").click().run()
    assert any("no GGUF file" in e.value for e in app.error)
    with Store() as store:
        from core import settings

        assert settings.load(store).generator_gguf == ""


def test_settings_report_an_unreachable_ollama_without_a_traceback(app, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:9")
    open_page(app, PAGES[3])
    assert any("not reachable" in w.value for w in app.warning)


def test_settings_list_the_models_of_a_live_ollama(app, monkeypatch):
    from tests.ollama_standin import OllamaStandin

    with OllamaStandin() as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        open_page(app, PAGES[3])
        assert any("reachable with 2 model(s)" in s.value for s in app.success)


@pytest.fixture
def pending_pairs():
    from core import formats

    with Store() as store:
        rows = [
            formats.PairRow(
                f"What is method number {i} in research?",
                f"It is a method, number {i}, with enough words in its answer to pass every check.",
                "ml",
            )
            for i in range(4)
        ]
        dataset.add_pairs(store, "review", rows, "pending")
        return [int(i) for i in dataset.pairs_frame(store, "review")["id"]]


def review_page(app: AppTest) -> AppTest:
    app.query_params["dataset"] = "review"
    return open_page(app, PAGES[1])


def click(app: AppTest, label: str) -> AppTest:
    next(b for b in app.button if b.label == label).click().run()
    assert not app.exception, app.exception
    return app


def statuses(ids):
    with Store() as store:
        return [dataset.get_pair(store, i)["status"] for i in ids]


def test_the_review_queue_accepts_rejects_skips_and_edits_one_pair_at_a_time(app, pending_pairs):
    review_page(app)
    click(app, "Accept")
    click(app, "Reject")
    click(app, "Skip")
    click(app, "Edit")
    app.text_area[1].input("An edited answer that is long enough to be a real answer.")
    click(app, "Save & accept")
    assert statuses(pending_pairs) == ["accepted", "rejected", "pending", "accepted"]
    with Store() as store:
        assert dataset.get_pair(store, pending_pairs[3])["answer"].startswith("An edited answer")
    assert [m.value for m in app.metric[:3]] == ["1", "2", "1"]  # pending, accepted, rejected


def test_undo_reverts_the_last_review_action(app, pending_pairs):
    review_page(app)
    click(app, "Reject")
    undo = next(b for b in app.button if b.label.startswith("Undo:"))
    assert undo.label == f"Undo: pair {pending_pairs[0]} rejected"
    undo.click().run()
    assert statuses(pending_pairs)[0] == "pending"


def test_a_stale_tab_cannot_overwrite_a_newer_edit(app, pending_pairs):
    review_page(app)  # shows the first pair at version 1
    with Store() as store:
        dataset.update_pair(store, pending_pairs[0], answer="Changed in another tab meanwhile, long enough.")
    click(app, "Reject")
    assert any("changed elsewhere" in e.value for e in app.error)
    assert statuses(pending_pairs)[0] == "pending"


def test_the_playground_streams_an_answer_with_its_f1(app, embedded_models):
    open_page(app, "../pages/playground.py")
    app.slider(key="pg0-t").set_value(0.0)
    app.slider(key="pg0-m").set_value(16)
    click(app, "Run")
    answer = app.text[-1].value if app.text else ""
    assert answer.strip()
    assert any("BERTScore F1" in c.value for c in app.caption)


def test_the_playground_compares_two_settings_side_by_side(app, embedded_models):
    open_page(app, "../pages/playground.py")
    app.toggle[0].set_value(True).run()
    for side, tokens in ((0, 8), (1, 24)):
        app.slider(key=f"pg{side}-t").set_value(0.0)
        app.slider(key=f"pg{side}-m").set_value(tokens)
    click(app, "Run")
    answers = [t.value for t in app.text if t.value.strip()]
    assert len(answers) >= 2 and len(answers[-1]) > len(answers[-2])  # B may use three times the tokens of A
    assert sum("first token" in c.value for c in app.caption) == 2


def test_a_crash_of_the_playground_engine_is_an_error_and_the_next_run_answers(app, embedded_models):
    """The engine runs in a process of its own: SIGSEGV it mid-answer and the app keeps serving."""
    from workbench import ui

    ui.loaded_backend.clear()  # an engine of its own, logging to this test's workspace
    log = engine_log()
    crashed = []

    def crash_when_answering():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not crashed:
            lines = [line for line in log.read_text().splitlines() if "answering" in line] if log.exists() else []
            if lines:
                pid = int(lines[-1].split("engine ")[1].split(":")[0])
                os.kill(pid, signal.SIGSTOP)  # frozen mid-answer, then crashed where it stands
                os.kill(pid, signal.SIGSEGV)
                os.kill(pid, signal.SIGCONT)
                crashed.append(pid)
            time.sleep(0.01)

    open_page(app, "../pages/playground.py")
    app.slider(key="pg0-t").set_value(0.0)
    app.slider(key="pg0-m").set_value(400)
    watcher = threading.Thread(target=crash_when_answering, daemon=True)
    watcher.start()
    click(app, "Run")
    watcher.join(timeout=5)
    assert crashed and any("died of SIGSEGV" in e.value for e in app.error), [e.value for e in app.error]

    app.slider(key="pg0-m").set_value(16)
    click(app, "Run")
    assert not app.error and app.text[-1].value.strip()
    assert any("first token" in c.value for c in app.caption)


def test_the_sweep_page_starts_a_sweep_and_shows_its_results(app):
    with Store() as store:
        dataset.make_split(store, "starter")
    open_page(app, "../pages/sweep.py")
    backend = next(s for s in app.selectbox if s.label == "Backend")
    assert backend.options[0] == "llamacpp"
    next(n for n in app.number_input if n.label.startswith("Questions")).set_value(3)
    click(app, "Start sweep")
    with Store() as store:
        job = jobs.list_jobs(store, kind="sweep")[0]
        assert jobs.wait(store, job.id, timeout=180).state == "done"
    app.run()
    assert not app.exception
    assert any("mean F1 by temperature" in str(c.proto.spec) for c in app.get("plotly_chart"))
    assert any("3 validation questions" in c.value for c in app.caption)

    click(app, "Confirm the best on test")
    with Store() as store:
        run_id, job_id = sweep.confirmation(store, sweep.list_sweeps(store)[-1].id)
        assert jobs.wait(store, job_id, timeout=180).state == "done"
    assert any(h.value == f"Confirmed on test: run {run_id}" for h in app.subheader)
    app.run()
    assert any(c.value.startswith(f"The best on test (run {run_id}): mean F1") for c in app.caption)


def test_compare_marks_a_run_chosen_on_its_own_questions_and_the_preset_asks_for_its_test_run(app):
    with Store() as store:
        sweep_id = scored_sweep(store, [A, B], part="validation", limit=4)
        best = sweep.sweep_runs(store, sweep_id)[0].id
    open_page(app, "../pages/compare.py")  # first visit: the two newest runs, the sweep's
    warnings = [w.value.replace("\\", "") for w in app.warning]
    assert any(w.startswith(f"run {best}: best of 2 configurations") and "optimistic" in w for w in warnings)
    click(app, "Baseline vs best decoding vs fine-tuned")
    assert any("confirm it on test first" in i.value.replace("\\", "") for i in app.info)
    click(app, "Confirm the best on test")
    with Store() as store:
        run_id, job_id = sweep.confirmation(store, sweep_id)
        assert jobs.wait(store, job_id, timeout=180).state == "done"
    assert any(f"as run {run_id} (job {job_id})" in i.value.replace("\\", "") for i in app.info)


def test_the_report_and_its_tables_are_built_when_asked_for(app):
    with Store() as store:
        scored_sweep(store, [A, B], part="validation", limit=4)
    open_page(app, "../pages/compare.py")
    assert not app.get("download_button")  # nothing is built on a visit
    click(app, "Build the report")
    labels = [b.proto.label for b in app.get("download_button")]
    assert labels == ["Download report.html", "Download summary.csv", "Download per_question.csv"]


def start_training_with(app: AppTest, **values) -> str:
    """Fill the training form (widgets by label, or by key for those both forms have) and press Start."""
    open_page(app, "../pages/training.py")
    for label, value in values.items():
        widgets = [w for kind in ("number_input", "text_input", "selectbox") for w in app.get(kind)]
        next(w for w in widgets if label in (w.label, w.key)).set_value(value)
    click(app, "Start training")
    return " ".join(e.value.replace("\\", "") for e in app.error)  # banners escape Markdown


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"Learning rate": 0.0}, "learning rate must be > 0"),
        ({"LoRA r": 0}, "LoRA r must be at least 1"),
        ({"train-model": "/no/such/model"}, "no model at '/no/such/model'"),
        (
            {"train-preset": "custom", "train-custom": "q_proj,no_such_proj"},
            "the model has no module(s) named no_such_proj",
        ),
        ({"train-method": "dpo"}, "has no preference triples for DPO"),
        ({"train-method": "dpo", "DPO beta": 0.0}, "DPO beta must be > 0"),
    ],
)
def test_the_training_form_refuses_bad_settings_with_the_reason_before_any_job_starts(app, values, reason):
    assert reason in start_training_with(app, **values)
    with Store() as store:
        assert jobs.list_jobs(store, kind="train") == []


def test_the_training_page_shows_the_preference_triples_the_ratings_give(app):
    from core import ratings
    from tests.test_compare import make_run
    from tests.test_judging import rate

    with Store() as store:
        one, other = make_run(store, [0.4] * 20), make_run(store, [0.5] * 20)
        rate(store, "ana", one, other, lambda pair_id: "b")
        expected = len([p for p in ratings.verdicts(store, one, other) if p[1] in train_ids(store)])
    open_page(app, "../pages/training.py")
    assert any(e.label == f"Preference data for DPO: {expected} train triples" for e in app.expander)
    assert [b.proto.label for b in app.get("download_button")] == [
        "Download train triples (JSONL: prompt, chosen, rejected)"
    ]


def train_ids(store) -> set[int]:
    from core import dataset

    return {p.id for p in dataset.select_pairs(store, "starter", "train")}


def test_the_search_form_refuses_an_empty_range(app):
    open_page(app, "../pages/training.py")
    next(n for n in app.number_input if n.key == "lr-lo").set_value(1e-2)
    click(app, "Start search")
    assert any("learning rate range is empty" in e.value.replace("\\", "") for e in app.error)
    with Store() as store:
        assert jobs.list_jobs(store, kind="train-search") == []
