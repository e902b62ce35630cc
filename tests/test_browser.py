"""End to end in headless Chromium: every page of the running app works, and an upload lands.

Screenshots go to $WORKBENCH_SHOTS (the README's docs/screenshots when refreshed), else to a
temporary folder.
"""

import json
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for_streamlit

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PAGES = {
    "overview": "",
    "dataset": "dataset",
    "playground": "playground",
    "sweep": "sweep",
    "training": "training",
    "compare": "compare",
    "jobs": "jobs",
    "settings": "settings",
}


@pytest.fixture
def page(browser):
    p = browser.new_page(viewport={"width": 1400, "height": 1000})
    yield p
    p.close()


@pytest.fixture(scope="module")
def shots_dir(tmp_path_factory) -> Path:
    path = Path(os.environ.get("WORKBENCH_SHOTS") or tmp_path_factory.mktemp("shots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("name", list(PAGES))
def test_each_page_works_in_a_real_browser(app_server, page, shots_dir, name):
    page.goto(f"{app_server.url}/{PAGES[name]}")
    wait_for_streamlit(page)
    assert not page.query_selector("[data-testid='stException']")
    heading = page.locator("h1").first.inner_text()
    assert heading.lower().startswith(name if name != "overview" else "qa tuning")
    nav = page.locator("[data-testid='stSidebarNav']").inner_text()
    assert all(
        label in nav
        for label in ("Overview", "Dataset", "Playground", "Sweep", "Training", "Compare", "Jobs", "Settings")
    )

    page.screenshot(path=str(shots_dir / f"{name}.png"), full_page=False)


def test_uploading_a_file_imports_it_and_a_bad_one_is_refused(app_server, page, tmp_path):
    good = tmp_path / "extra.csv"
    good.write_text("question,answer,field\nWhat is an ablation?,Removing one part to see its effect.,ml\n")
    bad = tmp_path / "broken.json"
    bad.write_text('[{"question": "q?", ')
    page.goto(f"{app_server.url}/dataset")
    wait_for_streamlit(page)
    page.get_by_role("tab", name="Import a file").click()
    for path, expected in ((bad, "broken.json, line 1"), (good, "imported 1 pair(s) into 'starter'")):
        page.locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(str(path))
        page.wait_for_timeout(500)
        click_button(page, "Import")
        page.get_by_text(expected).first.wait_for(timeout=30_000)
    assert not page.query_selector("[data-testid='stException']")


def click_button(page, name: str) -> None:
    """Click the visible button labelled `name` (its accessible name also holds icon and shortcut text)."""
    label = re.compile(rf"(^|\s){re.escape(name)}(\s|$)")
    page.get_by_role("button", name=label).filter(visible=True).first.click()
    page.wait_for_timeout(300)
    wait_for_streamlit(page)


def choose(page, label: str, option: str) -> None:
    """Pick an option of a Streamlit selectbox by its label. The list is opened again when it closed before the
    option showed (a late layout change on a long page, e.g. a data grid drawing its canvas, closes it)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.locator("[data-testid='stSelectbox']").filter(has_text=label).locator("input").first
    wanted = page.get_by_role("option", name=option, exact=True)
    for _ in range(3):
        box.click()
        try:
            wanted.wait_for(timeout=5000)
            break
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    wanted.click()
    page.wait_for_timeout(300)


def test_review_in_the_browser_survives_a_reload_then_splits_and_exports(app_server, page, tmp_path):

    datasets = pytest.importorskip("datasets")
    rows = "\n".join(
        f"Which check number {i} should a careful researcher run?,Check {i} is a sound step that "
        f"every careful researcher runs before trusting a result.,ml"
        for i in range(5)
    )
    upload = tmp_path / "review-e2e.csv"
    upload.write_text("question,answer,field\n" + rows + "\n")

    page.goto(f"{app_server.url}/dataset")
    wait_for_streamlit(page)
    page.get_by_role("tab", name="Import a file").click()
    page.locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(str(upload))
    page.wait_for_timeout(500)
    page.get_by_role("textbox", name="Into dataset").fill("review-e2e")
    choose(page, "Imported pairs are", "pending")
    click_button(page, "Import")
    page.get_by_text("imported 5 pair(s) into 'review-e2e' as pending").wait_for(timeout=30_000)

    page.get_by_role("tab", name="Review queue").click()
    for action in ("Accept", "Accept", "Reject"):
        # Wait for the next pair to be drawn: a click that lands on the pair just acted on is refused as stale.
        shown = page.get_by_text(re.compile(r"^Pair \d+ ·")).first
        before = shown.inner_text()
        click_button(page, action)
        deadline = time.monotonic() + 60
        while shown.inner_text() == before and time.monotonic() < deadline:
            page.wait_for_timeout(200)
    click_button(page, "Edit")
    page.get_by_role("textbox", name="Answer").fill("Edited in the browser: this answer replaces the generated one.")
    page.get_by_role("textbox", name="Answer").blur()
    page.wait_for_timeout(300)
    click_button(page, "Save & accept")

    page.reload()
    wait_for_streamlit(page)
    assert page.url.endswith("dataset=review-e2e")  # the choice lives in the URL, so a reload keeps it
    # A reloaded page may look idle before its first script run has drawn anything: wait for the counts.
    page.locator("[data-testid='stMetricValue']").nth(2).wait_for(timeout=60_000)
    metrics = page.locator("[data-testid='stMetricValue']").all_inner_texts()
    assert metrics[:3] == ["1", "3", "1"]  # pending, accepted, rejected
    db = sqlite3.connect(app_server.home / "workbench.sqlite")
    saved = db.execute(
        "SELECT p.status, p.answer FROM pairs p JOIN datasets d ON d.id = p.dataset_id "
        "WHERE d.name = 'review-e2e' ORDER BY p.id"
    ).fetchall()
    db.close()
    assert [s for s, _ in saved] == ["accepted", "accepted", "rejected", "accepted", "pending"]
    assert saved[3][1].startswith("Edited in the browser")

    page.get_by_role("tab", name="Split & export").click()
    click_button(page, "Draw a new split")
    page.get_by_text("split v1: 1 train / 1 validation / 1 test").first.wait_for(timeout=30_000)
    with page.expect_download() as download:
        click_button(page, "Download JSONL (3 pairs)")
    exported = tmp_path / "export.jsonl"
    download.value.save_as(exported)
    loaded = datasets.load_dataset("json", data_files=str(exported), split="train")
    assert loaded.num_rows == 3 and set(loaded.column_names) == {"question", "answer", "field"}
    assert any(a.startswith("Edited in the browser") for a in loaded["answer"])


def test_table_cell_edits_and_bulk_actions_are_saved(app_server, page):
    """The data grid is drawn on a canvas: cells are reached by position (fixed viewport, fixed column widths)."""

    page.goto(f"{app_server.url}/dataset?dataset=starter")
    wait_for_streamlit(page)
    page.get_by_role("tab", name="Table").click()
    grid = page.locator("[data-testid='stDataFrameResizable']").filter(visible=True).first
    box = grid.bounding_box()
    row = lambda i: box["y"] + 38 + 35 * i + 17  # noqa: E731 - header, then 35 px rows
    page.wait_for_timeout(500)
    page.mouse.dblclick(box["x"] + 270, row(1))  # the field cell of the second row
    page.wait_for_selector("textarea.gdg-input", timeout=10_000)  # the cell editor opened
    page.wait_for_timeout(500)
    page.keyboard.press("Control+a")
    page.keyboard.type("edited in the grid")
    page.wait_for_timeout(300)
    page.keyboard.press("Enter")

    page.wait_for_timeout(500)
    wait_for_streamlit(page)
    page.mouse.click(box["x"] + 38, row(0))  # tick the first row
    page.wait_for_timeout(500)
    wait_for_streamlit(page)
    click_button(page, "Reject (1)")
    wait_for_streamlit(page)
    db = sqlite3.connect(app_server.home / "workbench.sqlite")
    first, second = db.execute("SELECT status, field FROM pairs ORDER BY id LIMIT 2").fetchall()
    db.close()
    assert first[0] == "rejected"
    assert second[1] == "edited in the grid"


def test_playground_slider_and_streamed_answer(app_server, page, embedded_models):
    page.goto(f"{app_server.url}/playground")
    wait_for_streamlit(page)
    slider = page.get_by_role("slider", name="temperature").first
    assert slider.input_value() == "0.7"
    slider.focus()
    for _ in range(14):  # down to greedy decoding: a sampled answer may be empty, a greedy one is known
        page.keyboard.press("ArrowLeft")
    page.wait_for_timeout(300)
    assert slider.input_value() == "0"

    click_button(page, "Run")
    answer = page.locator("[data-testid='stText']").filter(visible=True).last
    answer.wait_for(timeout=120_000)

    page.get_by_text("first token").first.wait_for(timeout=120_000)
    assert answer.inner_text().strip()
    assert not page.query_selector("[data-testid='stException']")


def test_a_small_sweep_started_in_the_browser_shows_its_histogram(app_server, page, embedded_models):
    from tests.conftest import run_cli

    assert run_cli("split", "--dataset", "starter", env={"WORKBENCH_HOME": str(app_server.home)}).returncode == 0
    page.goto(f"{app_server.url}/sweep")
    wait_for_streamlit(page)
    questions = page.get_by_role("spinbutton", name=re.compile("Questions"))
    questions.fill("2")
    questions.press("Tab")
    grid_temperature = page.get_by_role("textbox", name="temperature")
    grid_temperature.fill("0, 1")
    max_tokens = page.get_by_role("textbox", name="max_tokens")
    max_tokens.fill("24")
    click_button(page, "Start sweep")
    page.locator(".js-plotly-plot").first.wait_for(timeout=180_000)
    page.get_by_text("mean F1 by temperature").first.wait_for(timeout=60_000)
    assert not page.query_selector("[data-testid='stException']")


def test_compare_two_runs_rate_three_blind_pairs_that_survive_a_reload_then_judge_them(app_server, page):

    from tests.conftest import run_cli

    env = {"WORKBENCH_HOME": str(app_server.home)}
    run_cli("split", "--dataset", "starter", env=env)  # may exist already from another test
    result = run_cli(
        "sweep",
        "--dataset",
        "starter",
        "--split",
        "all",
        "--limit",
        "100",
        "--backend",
        "echo",
        "--grid",
        "max_tokens=5,20,40",
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr

    page.goto(f"{app_server.url}/compare")
    wait_for_streamlit(page)
    # Other tests of this module made runs too: pick the three echo runs by name.
    runs_box = page.locator("[data-testid='stMultiSelect']").filter(has_text="Runs")
    runs_box.get_by_role("button", name="Clear all").click()
    wait_for_streamlit(page)
    for _ in range(3):
        runs_box.locator("input").click()
        page.keyboard.type("echo")
        page.keyboard.press("Enter")
        page.keyboard.press("Escape")
        started = time.perf_counter()
        page.wait_for_timeout(200)
        wait_for_streamlit(page)
    print(f"\ncompare page with three runs of 100 answers each: {time.perf_counter() - started:.2f} s (warm server)")
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    page.locator("h1").first.click()  # close the dropdown
    assert runs_box.inner_text().count("echo") == 3

    assert page.locator(".js-plotly-plot").count() >= 1
    assert "run" in page.locator(".js-plotly-plot").first.inner_text()

    page.get_by_role("tab", name="Summary").click()
    page.get_by_text("95% bootstrap interval").wait_for(timeout=30_000)

    page.get_by_role("tab", name="Blind rating").click()
    page.get_by_role("textbox", name="Your name").fill("ada")
    page.get_by_role("textbox", name="Your name").press("Enter")
    wait_for_streamlit(page)
    for _ in range(3):
        left = page.get_by_text(re.compile(r"\d+ left to rate")).first
        before = left.inner_text()
        click_button(page, "Answer 1 is better")
        deadline = time.monotonic() + 60  # the next pair must be drawn before the next verdict
        while left.inner_text() == before and time.monotonic() < deadline:
            page.wait_for_timeout(200)
    page.reload()
    wait_for_streamlit(page)
    db = sqlite3.connect(app_server.home / "workbench.sqlite")
    saved = db.execute("SELECT COUNT(*) FROM ratings WHERE rater = 'ada'").fetchone()[0]
    db.close()
    assert saved == 3
    page.get_by_role("tab", name="Blind rating").click()
    page.get_by_role("textbox", name="Your name").fill("ada")
    page.get_by_role("textbox", name="Your name").press("Enter")
    wait_for_streamlit(page)
    page.get_by_text("97 left to rate").wait_for(timeout=30_000)

    # The judge, on the pair just rated: an Ollama stand-in that prefers the longer answer, whichever side.
    from tests.ollama_standin import OllamaStandin

    def prefers_longer(body: dict) -> str:
        first, second = re.search(r"Answer 1: (.*)\n\nAnswer 2: (.*)\n\nWhich", body["prompt"], re.S).groups()
        better = "tie" if len(first) == len(second) else ("1" if len(first) > len(second) else "2")
        return json.dumps({"reason": "the longer one", "better": better})

    with OllamaStandin() as server:
        server.reply = prefers_longer
        assert run_cli("settings", "--ollama-host", server.url, env=env).returncode == 0
        page.get_by_role("tab", name="Judge").click()
        form = page.get_by_test_id("stForm").filter(has_text="Run the judge")
        form.locator("[data-testid='stSelectbox']").filter(has_text="Backend").locator("input").first.click()
        page.keyboard.type("ollama")
        page.keyboard.press("Enter")
        form.get_by_role("textbox", name="Model").fill("standin-small")
        click_button(page, "Run the judge")
        page.get_by_text(re.compile(r"done: run \d+ wins")).first.wait_for(timeout=120_000)
        asked = len([r for r in server.requests if r.path == "/api/generate"])
    assert asked == 200  # 100 shared questions, both orders
    page.reload()
    wait_for_streamlit(page)
    page.get_by_role("tab", name="Judge").click()
    table = page.locator("[data-testid='stDataFrame']").filter(visible=True).last
    table.wait_for(timeout=30_000)
    text = page.locator("[data-testid='stMainBlockContainer']").inner_text()
    assert re.search(r"Humans — run \d+ wins \d+% \(95% CI \d+%–\d+%\) of 3", text), text
    assert re.search(r"pairwise judge · ollama · standin-small — run \d+ wins \d+% .* position bias 0%", text)
    assert "agrees with the humans on" in text and "of 3 human verdicts" in text


def _step(page) -> int:
    tile = page.locator("[data-testid='stMetric']").filter(has_text="Step").first
    return int(tile.locator("[data-testid='stMetricValue']").inner_text())


def test_training_started_from_the_button_draws_a_growing_loss_curve_then_cancels(app_server, page, tiny_llama):
    page.goto(f"{app_server.url}/training")
    wait_for_streamlit(page)
    page.get_by_role("textbox", name="Base model").first.fill(str(tiny_llama))
    page.get_by_role("spinbutton", name="Epochs").first.fill("5")
    page.get_by_role("spinbutton", name="Batch size").first.fill("1")
    choose(page, "Evaluate with", "none")  # llama.cpp evaluation needs the embedded base model
    click_button(page, "Start training")
    page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
    page.locator("[data-testid='stMetric']").filter(has_text="Step").first.wait_for(timeout=60_000)
    first = _step(page)
    deadline = time.monotonic() + 60
    while _step(page) <= first + 2 and time.monotonic() < deadline:
        page.wait_for_timeout(500)
    assert _step(page) > first + 2  # the curve is redrawn as steps arrive
    assert "train loss" in page.locator(".js-plotly-plot").first.inner_text()

    click_button(page, "Cancel")
    page.get_by_text("cancelled").first.wait_for(timeout=60_000)
    with sqlite3.connect(app_server.home / "workbench.sqlite") as db:
        [(stopped,)] = db.execute("SELECT MAX(step) FROM training_metrics WHERE name = 'train_loss'").fetchall()
    page.reload()  # the run, its curve and its state come back from the store
    wait_for_streamlit(page)
    page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
    assert _step(page) == stopped and page.get_by_text("cancelled").first.is_visible()
    assert page.get_by_role("button", name=re.compile("Resume")).first.is_visible()
    assert not page.query_selector("[data-testid='stException']")
