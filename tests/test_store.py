"""The store: one SQLite file in WAL mode, numbered migrations, all-or-nothing transactions."""

import sqlite3

import pytest

from core import workspace
from core.store import MIGRATIONS, Store

pytestmark = pytest.mark.empty_workspace


def test_store_lives_in_the_workspace_in_wal_mode(store, workbench_home):
    assert store.path == workbench_home / "workbench.sqlite" == workspace.db_path()
    assert store.one("PRAGMA journal_mode")[0] == "wal"
    assert store.one("PRAGMA foreign_keys")[0] == 1


def test_a_new_store_is_migrated_to_the_newest_schema(store):
    assert store.schema_version == len(MIGRATIONS)
    tables = {r["name"] for r in store.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    expected = {
        "datasets",
        "pairs",
        "pair_history",
        "splits",
        "split_members",
        "runs",
        "generations",
        "scores",
        "jobs",
        "job_log",
        "training_metrics",
        "settings",
    }
    assert expected <= tables


def test_reopening_does_not_migrate_again(store):
    store.set_setting("marker", 1)
    again = Store(store.path)
    assert again.schema_version == len(MIGRATIONS)
    assert again.get_setting("marker") == 1
    again.close()


def test_a_failed_transaction_leaves_nothing_behind(store):
    with pytest.raises(RuntimeError), store.transaction() as conn:
        conn.execute("INSERT INTO datasets (name, created_at) VALUES ('a', 0)")
        raise RuntimeError("boom")
    assert store.query("SELECT * FROM datasets") == []


def test_nested_transactions_join_the_outer_one(store):
    with pytest.raises(sqlite3.IntegrityError), store.transaction():
        store.execute("INSERT INTO datasets (name, created_at) VALUES ('a', 0)")
        store.execute("INSERT INTO datasets (name, created_at) VALUES ('a', 0)")  # duplicate name
    assert store.query("SELECT * FROM datasets") == []


def test_settings_round_trip_as_json(store):
    store.set_setting("k", {"a": [1, 2]})
    store.set_setting("k", {"a": [3]})
    assert store.get_setting("k") == {"a": [3]}
    assert store.get_setting("missing", "default") == "default"
