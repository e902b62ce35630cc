"""End to end in headless Chromium: every page of the running app works, and an upload lands.

Screenshots go to $WORKBENCH_SHOTS (the README's docs/screenshots when refreshed), else to a
temporary folder.
"""

import os
from pathlib import Path

import pytest

from tests.conftest import wait_for_streamlit

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PAGES = {"overview": "", "dataset": "dataset", "jobs": "jobs", "settings": "settings"}


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
    assert all(label in nav for label in ("Overview", "Dataset", "Jobs", "Settings"))
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
        page.get_by_role("button", name="Import").click()
        page.get_by_text(expected).first.wait_for(timeout=30_000)
    assert not page.query_selector("[data-testid='stException']")
