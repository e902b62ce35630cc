"""Fault injection on the review queue: another tab changes the pair being edited.

The typed text is never dropped and never silently written over the other change: the page keeps
the edit form, shows both versions, and lets the user save the typed one over the other, take the
other one, or keep editing. The other tab is a second connection to the same SQLite store.
"""

import pytest
from streamlit.testing.v1 import AppTest

from core import dataset, formats
from core.store import Store
from tests.test_app import click, review_page

TYPED = "My answer typed in this tab, long enough to be a real answer."
THEIRS = "Their answer saved in another tab meanwhile, also long enough."


@pytest.fixture
def app(workbench_home):
    return AppTest.from_file("../workbench/app.py", default_timeout=60)


@pytest.fixture
def pending_pairs() -> list[int]:
    """Two pending pairs in the dataset "review" (the one review_page opens)."""
    rows = [
        formats.PairRow(f"What is research method {i}?", f"Method {i} is a method with a long answer.", "ml")
        for i in range(2)
    ]
    with Store() as store:
        dataset.add_pairs(store, "review", rows, "pending")
        return [int(i) for i in dataset.pairs_frame(store, "review")["id"]]


def edit_answer(app: AppTest, pair_id: int) -> AppTest:
    """Open the editor on the first pair and type an answer (not yet sent: no rerun)."""
    review_page(app)
    click(app, "Edit")
    app.text_area(key=f"a-{pair_id}").input(TYPED)
    return app


def change_in_another_tab(pair_id: int, **changes: str) -> None:
    with Store() as other:
        dataset.update_pair(other, pair_id, **changes)


def stored(pair_id: int) -> dict:
    with Store() as store:
        return dataset.get_pair(store, pair_id)


def times_saved(pair_id: int, text: str) -> int:
    with Store() as store:
        return sum(h["new_value"] == text for h in dataset.pair_history(store, pair_id) if h["column_name"] == "answer")


def shown_texts(app: AppTest) -> list[str]:
    return [t.value for t in app.text]


def editor_open(app: AppTest, pair_id: int) -> bool:
    return any(t.key == f"a-{pair_id}" for t in app.text_area)


OTHER_CHANGES = {
    "their answer, still pending": {"answer": THEIRS},
    "their answer, accepted (the pair leaves the queue)": {"answer": THEIRS, "status": "accepted"},
    "their answer, rejected (the pair leaves the queue)": {"answer": THEIRS, "status": "rejected"},
}


@pytest.mark.parametrize("changes", OTHER_CHANGES.values(), ids=OTHER_CHANGES.keys())
def test_save_after_another_tab_changed_the_pair_keeps_the_typed_text_and_shows_both_versions(
    app, pending_pairs, changes
):
    first = pending_pairs[0]
    edit_answer(app, first)
    change_in_another_tab(first, **changes)
    click(app, "Save & accept")

    assert app.text_area(key=f"a-{first}").value == TYPED  # still in the form, still editable
    assert THEIRS in shown_texts(app)  # the version now in the store, beside it
    assert any("changed elsewhere" in w.value for w in app.warning)
    assert stored(first)["answer"] == THEIRS and times_saved(first, TYPED) == 0  # nothing overwritten


def test_saving_the_typed_version_over_the_other_stores_it_once(app, pending_pairs):
    first = pending_pairs[0]
    edit_answer(app, first)
    change_in_another_tab(first, answer=THEIRS, status="rejected")
    click(app, "Save & accept")
    click(app, "Save mine over it")

    pair = stored(first)
    assert (pair["answer"], pair["status"]) == (TYPED, "accepted")
    assert times_saved(first, TYPED) == 1 and times_saved(first, THEIRS) == 1  # both edits are in the history
    assert not editor_open(app, first)  # the editor closed; the queue moved on


def test_taking_the_other_version_drops_the_typed_text_and_keeps_theirs(app, pending_pairs):
    first = pending_pairs[0]
    edit_answer(app, first)
    change_in_another_tab(first, answer=THEIRS)
    click(app, "Save & accept")
    click(app, "Take the other version")

    pair = stored(first)
    assert (pair["answer"], pair["status"]) == (THEIRS, "pending") and times_saved(first, TYPED) == 0
    assert not editor_open(app, first) and THEIRS in shown_texts(app)  # the pair as stored, back in the queue
    click(app, "Edit")
    assert app.text_area(key=f"a-{first}").value == THEIRS  # a new edit starts from their text


def test_keep_editing_after_a_conflict_saves_the_edit_over_the_version_shown(app, pending_pairs):
    first = pending_pairs[0]
    edit_answer(app, first)
    change_in_another_tab(first, answer=THEIRS)
    click(app, "Save & accept")
    click(app, "Keep editing")
    assert app.text_area(key=f"a-{first}").value == TYPED and not app.warning
    click(app, "Save & accept")

    assert stored(first)["answer"] == TYPED and times_saved(first, TYPED) == 1


def test_a_change_elsewhere_while_typing_is_caught_even_after_a_rerun(app, pending_pairs):
    """A rerun in between (the text box losing focus, any other widget) must not move the edit's base version."""
    first = pending_pairs[0]
    review_page(app)
    click(app, "Edit")
    change_in_another_tab(first, answer=THEIRS)
    app.run()
    app.text_area(key=f"a-{first}").input(TYPED)
    click(app, "Save & accept")

    assert stored(first)["answer"] == THEIRS and times_saved(first, TYPED) == 0
    assert app.text_area(key=f"a-{first}").value == TYPED and THEIRS in shown_texts(app)


def test_an_emptied_answer_is_refused_with_a_banner_and_the_form_keeps_the_rest(app, pending_pairs):
    first = pending_pairs[0]
    edit_answer(app, first)
    app.text_area(key=f"q-{first}").input("A question edited before the answer was emptied?")
    app.text_area(key=f"a-{first}").input("   ")
    click(app, "Save & accept")

    assert any("the answer cannot be empty" in e.value for e in app.error)
    assert app.text_area(key=f"q-{first}").value == "A question edited before the answer was emptied?"
    assert stored(first)["status"] == "pending" and stored(first)["version"] == 1
