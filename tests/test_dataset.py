"""Datasets: imports land whole, edits keep history, splits are frozen versions, exports load back."""

import json

import pytest

from core import dataset, formats, intake
from core.errors import BadInput, NotFound


@pytest.mark.empty_workspace
def test_the_starter_dataset_is_imported_once_on_first_run(store):
    summary = intake.ensure_starter(store)
    assert summary.dataset == "starter" and summary.added >= 100
    split = dataset.latest_split(store, "starter")  # split 70/10/20, ready to sweep, choose and train
    assert (split.version, split.seed, split.test_size, split.validation_size) == (1, 42, 0.2, 0.1)
    assert intake.ensure_starter(store) is None
    assert dataset.status_counts(store, "starter")["accepted"] == summary.added


def test_starter_pairs_have_fields_and_multi_sentence_answers(store):
    intake.ensure_starter(store)
    frame = dataset.pairs_frame(store, "starter")
    assert frame["field"].nunique() >= 5
    assert frame["question"].str.endswith("?").all()
    assert frame["question"].str.lower().nunique() == len(frame)


def test_a_bad_file_changes_nothing(store, tmp_path):
    intake.ensure_starter(store)
    before = dataset.pairs_frame(store, "starter").to_dict("records")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "answer": "a"}\n{"question": \n')
    with pytest.raises(BadInput, match="line 2"):
        intake.import_file(store, bad, "starter")
    assert dataset.pairs_frame(store, "starter").to_dict("records") == before


def test_blank_rows_are_skipped_and_counted(store, tmp_path):
    path = tmp_path / "some.csv"
    path.write_text("question,answer\nq1?,a1\n ,a2\nq3?,\nq4?,a4\n")
    summary = intake.import_file(store, path)
    assert (summary.dataset, summary.added, summary.skipped_blank) == ("some", 2, 2)


def test_every_edit_is_kept_with_its_history(store):
    dataset.add_pairs(store, "d", [formats.PairRow("q?", "a")], "pending")
    pair_id = int(dataset.pairs_frame(store, "d")["id"][0])
    version = dataset.update_pair(store, pair_id, answer="a better answer", status="accepted")
    assert version == 2
    history = dataset.pair_history(store, pair_id)
    assert {(h["column_name"], h["old_value"], h["new_value"]) for h in history} == {
        ("answer", "a", "a better answer"),
        ("status", "pending", "accepted"),
    }
    assert all(h["changed_at"] > 0 for h in history)


def test_an_edit_from_a_stale_copy_is_refused(store):
    dataset.add_pairs(store, "d", [formats.PairRow("q?", "a")], "pending")
    pair_id = int(dataset.pairs_frame(store, "d")["id"][0])
    dataset.update_pair(store, pair_id, expected_version=1, answer="first tab")
    with pytest.raises(BadInput, match="changed elsewhere"):
        dataset.update_pair(store, pair_id, expected_version=1, answer="second tab")
    assert dataset.pairs_frame(store, "d")["answer"][0] == "first tab"


def test_empty_answers_and_unknown_statuses_are_refused(store):
    dataset.add_pairs(store, "d", [formats.PairRow("q?", "a")], "pending")
    pair_id = int(dataset.pairs_frame(store, "d")["id"][0])
    with pytest.raises(BadInput):
        dataset.update_pair(store, pair_id, answer="  ")
    with pytest.raises(BadInput):
        dataset.set_status(store, pair_id, "maybe")


def test_a_split_is_stratified_by_field_and_seeded(store):
    intake.ensure_starter(store)
    first = dataset.make_split(store, "starter", 0.2, seed=7)
    test_pairs = dataset.select_pairs(store, "starter", "test")
    n = dataset.status_counts(store, "starter")["accepted"]
    assert first.train + first.validation + first.test == n
    assert abs(first.test / n - 0.2) < 0.05 and abs(first.validation / n - 0.1) < 0.05
    all_fields = {p.field for p in dataset.select_pairs(store, "starter")}
    assert {p.field for p in test_pairs} == all_fields  # every field is evaluated
    validation = dataset.select_pairs(store, "starter", "validation")
    assert {p.field for p in validation} == all_fields  # and every field is chosen on
    train = dataset.select_pairs(store, "starter", "train")
    assert not {p.id for p in validation} & ({p.id for p in test_pairs} | {p.id for p in train})
    again = dataset.make_split(store, "starter", 0.2, seed=7)
    assert again.version == first.version + 1
    assert [p.id for p in dataset.select_pairs(store, "starter", "test", split_id=again.id)] == [
        p.id for p in test_pairs
    ]


def test_a_split_without_a_validation_part_says_what_that_means(store):
    intake.ensure_starter(store)
    info = dataset.make_split(store, "starter", 0.2, seed=7, validation_size=0)
    assert info.validation == 0 and info.train + info.test == dataset.status_counts(store, "starter")["accepted"]
    assert info.describe().endswith("(no validation part)")
    assert "no validation part" in dataset.no_validation_message(info)
    with pytest.raises(BadInput, match="leave pairs to train on"):
        dataset.make_split(store, "starter", 0.5, validation_size=0.5)


def test_a_split_made_before_validation_parts_keeps_working(tmp_path):
    """A store of schema 5 (train/test splits only) is migrated: its split keeps its parts and has no validation."""
    import sqlite3

    from core.store import Store

    path = tmp_path / "old.sqlite"
    with Store(path) as new:  # the newest schema, then rolled back by hand to what migration 5 left
        dataset.add_pairs(new, "d", [formats.PairRow(f"q{i}?", f"a{i}") for i in range(10)], "accepted")
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP TABLE judge_pairwise; DROP TABLE judge_rubric; DROP TABLE judges;"
        "DROP TABLE split_members; ALTER TABLE splits DROP COLUMN validation_size;"
        " ALTER TABLE runs DROP COLUMN selection;"
        "CREATE TABLE split_members (split_id INTEGER NOT NULL REFERENCES splits(id) ON DELETE CASCADE,"
        " pair_id INTEGER NOT NULL REFERENCES pairs(id) ON DELETE CASCADE,"
        " part TEXT NOT NULL CHECK (part IN ('train', 'test')), PRIMARY KEY (split_id, pair_id));"
        "INSERT INTO splits (dataset_id, version, seed, test_size, stratified, created_at)"
        " VALUES (1, 1, 42, 0.2, 0, 0);"
        "INSERT INTO split_members SELECT 1, id, CASE WHEN id <= 2 THEN 'test' ELSE 'train' END FROM pairs;"
        "PRAGMA user_version = 5;"
    )
    conn.close()
    with Store(path) as old:
        split = dataset.latest_split(old, "d")
        assert (split.train, split.validation, split.test, split.validation_size) == (8, 0, 2, 0.0)
        assert [p.id for p in dataset.select_pairs(old, "d", "test")] == [1, 2]
        assert dataset.make_split(old, "d").validation == 1  # a new split there has its validation part


def test_earlier_split_versions_stay_frozen(store):
    intake.ensure_starter(store)
    v1 = dataset.make_split(store, "starter", seed=1)
    v1_test = [p.id for p in dataset.select_pairs(store, "starter", "test", split_id=v1.id)]
    dataset.make_split(store, "starter", seed=2)
    assert [p.id for p in dataset.select_pairs(store, "starter", "test", split_id=v1.id)] == v1_test
    assert dataset.latest_split(store, "starter").version == v1.version + 1


def test_splitting_needs_accepted_pairs(store):
    dataset.add_pairs(store, "d", [formats.PairRow("q?", "a")], "pending")
    with pytest.raises(BadInput, match="0 accepted"):
        dataset.make_split(store, "d")
    with pytest.raises(NotFound):
        dataset.make_split(store, "nope")


def test_export_writes_accepted_pairs_of_a_split_part(store, tmp_path):
    intake.ensure_starter(store)
    info = dataset.make_split(store, "starter")
    out = tmp_path / "test.jsonl"
    assert dataset.export_pairs(store, "starter", out, "jsonl", "test") == info.test
    first = json.loads(out.read_text().splitlines()[0])
    assert set(first) == {"question", "answer", "field"}
    csv_out = tmp_path / "all.csv"
    n = dataset.export_pairs(store, "starter", csv_out, "csv")
    assert len(formats.read_pairs(csv_out).rows) == n == info.train + info.validation + info.test


def test_a_bulk_status_change_is_one_undo_step(store):
    ids = [int(i) for i in dataset.pairs_frame(store, "starter")["id"][:5]]
    dataset.set_status(store, ids, "rejected")
    assert dataset.last_change(store, "starter").summary == "5 pairs rejected"
    dataset.undo_last_change(store, "starter")
    assert set(dataset.pairs_frame(store, "starter")["status"]) == {"accepted"}


def test_undo_steps_back_one_change_at_a_time_and_keeps_history(store):
    pair_id = int(dataset.pairs_frame(store, "starter")["id"][0])
    original = dataset.get_pair(store, pair_id)["answer"]
    dataset.update_pair(store, pair_id, answer="second")
    dataset.set_status(store, pair_id, "rejected")
    assert dataset.undo_last_change(store, "starter").summary == f"pair {pair_id} rejected"
    assert dataset.get_pair(store, pair_id)["status"] == "accepted"
    dataset.undo_last_change(store, "starter")
    assert dataset.get_pair(store, pair_id)["answer"] == original
    assert dataset.undo_last_change(store, "starter") is None
    history = dataset.pair_history(store, pair_id)
    assert [h["new_value"] for h in history] == ["second", "rejected", "accepted", original]


def test_filters_combine_status_field_flag_and_text(store):
    dataset.add_pairs(
        store,
        "mixed",
        [
            formats.PairRow("no mark here", "short", "x"),
            formats.PairRow("What is a baseline?", "A reference method.", "y"),
        ],
        "pending",
    )
    from core import quality

    quality.flag_dataset(store, "mixed")
    assert len(dataset.pairs_frame(store, "mixed", flag="no_question_mark")) == 1
    assert len(dataset.pairs_frame(store, "mixed", fields=["y"], search="BASELINE")) == 1
    assert len(dataset.pairs_frame(store, "mixed", statuses=["accepted"])) == 0
    assert (
        dataset.next_in_queue(store, "mixed", skipped={dataset.pairs_frame(store, "mixed")["id"][0]})["question"]
        == "What is a baseline?"
    )


def test_undo_refuses_when_a_newer_change_arrived_from_elsewhere(store):
    ids = [int(i) for i in dataset.pairs_frame(store, "starter")["id"][:2]]
    dataset.set_status(store, ids[0], "rejected")
    seen = dataset.last_change(store, "starter").id
    dataset.set_status(store, ids[1], "rejected")  # another tab
    with pytest.raises(BadInput, match="another change"):
        dataset.undo_last_change(store, "starter", expected_change_id=seen)
    assert dataset.get_pair(store, ids[1])["status"] == "rejected"


def test_a_cleared_grid_cell_clears_the_field_but_never_the_question(store):
    pair_id = int(dataset.pairs_frame(store, "starter")["id"][0])
    dataset.update_pairs(store, {pair_id: {"field": None}})
    assert dataset.get_pair(store, pair_id)["field"] == ""
    with pytest.raises(BadInput, match="question cannot be empty"):
        dataset.update_pairs(store, {pair_id: {"question": None}})
