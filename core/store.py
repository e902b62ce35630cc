"""The store: one SQLite file (WAL) holding everything the workbench knows.

Owns the connection, the numbered migrations and transactions. Domain rules (what an
import is, how a split is drawn) live in their own modules; this one never decides them.
Every write goes through `Store.transaction()`, so a multi-row change lands whole or not at all.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from core import workspace
from core.errors import NotFound

T = TypeVar("T")
IN_CHUNK = 500  # values per IN (...) clause, well under SQLite's limit on bound variables

# Each entry is one schema version; never edit a released entry, append a new one.
MIGRATIONS: list[str] = [
    # 1: the initial schema
    """
    CREATE TABLE datasets (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        source TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL
    );
    CREATE TABLE pairs (
        id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
        question TEXT NOT NULL,
        answer TEXT NOT NULL,
        field TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL CHECK (status IN ('pending', 'accepted', 'rejected')),
        metadata TEXT NOT NULL DEFAULT '{}',
        provenance TEXT NOT NULL DEFAULT '{}',
        version INTEGER NOT NULL DEFAULT 1,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX pairs_by_dataset ON pairs (dataset_id, status);
    CREATE TABLE pair_history (
        id INTEGER PRIMARY KEY,
        pair_id INTEGER NOT NULL REFERENCES pairs(id) ON DELETE CASCADE,
        column_name TEXT NOT NULL,
        old_value TEXT,
        new_value TEXT,
        changed_at REAL NOT NULL
    );
    CREATE INDEX pair_history_by_pair ON pair_history (pair_id);
    CREATE TABLE splits (
        id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        seed INTEGER NOT NULL,
        test_size REAL NOT NULL,
        stratified INTEGER NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (dataset_id, version)
    );
    CREATE TABLE split_members (
        split_id INTEGER NOT NULL REFERENCES splits(id) ON DELETE CASCADE,
        pair_id INTEGER NOT NULL REFERENCES pairs(id) ON DELETE CASCADE,
        part TEXT NOT NULL CHECK (part IN ('train', 'test')),
        PRIMARY KEY (split_id, pair_id)
    );
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        label TEXT NOT NULL DEFAULT '',
        dataset_id INTEGER REFERENCES datasets(id),
        split_id INTEGER REFERENCES splits(id),
        part TEXT NOT NULL DEFAULT 'all',
        backend TEXT NOT NULL,
        model TEXT NOT NULL,
        model_hash TEXT NOT NULL DEFAULT '',
        adapter TEXT NOT NULL DEFAULT '',
        params TEXT NOT NULL DEFAULT '{}',
        prompt_template TEXT NOT NULL DEFAULT '',
        config TEXT NOT NULL DEFAULT '{}',
        job_id INTEGER REFERENCES jobs(id),
        created_at REAL NOT NULL
    );
    CREATE TABLE generations (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        pair_id INTEGER NOT NULL REFERENCES pairs(id),
        repeat INTEGER NOT NULL DEFAULT 0,
        answer TEXT NOT NULL,
        n_tokens INTEGER,
        seconds REAL,
        created_at REAL NOT NULL,
        UNIQUE (run_id, pair_id, repeat)
    );
    CREATE TABLE scores (
        id INTEGER PRIMARY KEY,
        generation_id INTEGER NOT NULL REFERENCES generations(id) ON DELETE CASCADE,
        scorer TEXT NOT NULL,
        precision REAL,
        recall REAL,
        f1 REAL,
        f1_rescaled REAL,
        rouge_l REAL,
        created_at REAL NOT NULL,
        UNIQUE (generation_id, scorer)
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        params TEXT NOT NULL DEFAULT '{}',
        state TEXT NOT NULL CHECK (state IN
            ('queued', 'running', 'interrupted', 'cancelled', 'failed', 'done')),
        done INTEGER NOT NULL DEFAULT 0,
        total INTEGER,
        message TEXT NOT NULL DEFAULT '',
        figures TEXT NOT NULL DEFAULT '{}',
        error TEXT NOT NULL DEFAULT '',
        pid INTEGER,
        pid_started REAL,
        heartbeat_at REAL,
        cancel_requested_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE INDEX jobs_by_state ON jobs (state);
    CREATE TABLE job_log (
        id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        at REAL NOT NULL,
        line TEXT NOT NULL
    );
    CREATE INDEX job_log_by_job ON job_log (job_id, id);
    CREATE TABLE training_metrics (
        id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        epoch REAL,
        name TEXT NOT NULL,
        value REAL NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX training_metrics_by_job ON training_metrics (job_id, name, step);
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 2: review: quality flags, grouped changes (for undo), cached sentence embeddings
    """
    ALTER TABLE pairs ADD COLUMN flags TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE pairs ADD COLUMN duplicate_of INTEGER;
    ALTER TABLE pairs ADD COLUMN duplicate_score REAL;
    CREATE TABLE changes (
        id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('edit', 'undo')),
        summary TEXT NOT NULL DEFAULT '',
        undone INTEGER NOT NULL DEFAULT 0,
        at REAL NOT NULL
    );
    ALTER TABLE pair_history ADD COLUMN change_id INTEGER REFERENCES changes(id);
    CREATE INDEX pair_history_by_change ON pair_history (change_id);
    CREATE TABLE embeddings (
        text_hash TEXT NOT NULL,
        model TEXT NOT NULL,
        vector BLOB NOT NULL,
        PRIMARY KEY (text_hash, model)
    );
    """,
    # 3: scoring caches and sweeps
    """
    CREATE TABLE reference_embeddings (
        scorer TEXT NOT NULL,
        text_hash TEXT NOT NULL,
        n_tokens INTEGER NOT NULL,
        dim INTEGER NOT NULL,
        embedding BLOB NOT NULL,
        PRIMARY KEY (scorer, text_hash)
    );
    CREATE TABLE score_baselines (
        scorer TEXT NOT NULL,
        dataset_id INTEGER NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
        f1 REAL NOT NULL,
        precision REAL NOT NULL,
        recall REAL NOT NULL,
        n_pairs INTEGER NOT NULL,
        PRIMARY KEY (scorer, dataset_id)
    );
    CREATE TABLE sweeps (
        id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
        config TEXT NOT NULL,
        job_id INTEGER REFERENCES jobs(id),
        created_at REAL NOT NULL
    );
    ALTER TABLE runs ADD COLUMN sweep_id INTEGER REFERENCES sweeps(id);
    ALTER TABLE runs ADD COLUMN scorer TEXT NOT NULL DEFAULT '';
    CREATE INDEX generations_by_run ON generations (run_id);
    CREATE INDEX scores_by_generation ON scores (generation_id);
    """,
    # 4: blind human ratings of two runs' answers to the same question
    """
    CREATE TABLE ratings (
        id INTEGER PRIMARY KEY,
        rater TEXT NOT NULL,
        pair_id INTEGER NOT NULL REFERENCES pairs(id) ON DELETE CASCADE,
        run_a INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        run_b INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        left_run INTEGER NOT NULL,
        verdict TEXT NOT NULL CHECK (verdict IN ('a', 'b', 'tie')),
        created_at REAL NOT NULL,
        CHECK (run_a < run_b),
        UNIQUE (rater, pair_id, run_a, run_b)
    );
    """,
    # 5: a run asks and is scored on the texts its questions had when it was made (an edit later changes
    # neither its prompts nor its references); a sweep freezes its questions once for all its runs,
    # an Optuna trial's run made later included. Runs and sweeps made before this migration get the
    # texts their pairs have now: what they were before an edit is not known at this point.
    """
    CREATE TABLE run_pairs (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        pair_id INTEGER NOT NULL REFERENCES pairs(id),
        question TEXT NOT NULL,
        reference TEXT NOT NULL,
        field TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (run_id, pair_id)
    );
    INSERT INTO run_pairs (run_id, position, pair_id, question, reference, field)
        SELECT r.id, j.key, p.id, p.question, p.answer, p.field
        FROM runs r, json_each(r.config, '$.pair_ids') j JOIN pairs p ON p.id = j.value;
    CREATE TABLE sweep_pairs (
        sweep_id INTEGER NOT NULL REFERENCES sweeps(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        pair_id INTEGER NOT NULL REFERENCES pairs(id),
        question TEXT NOT NULL,
        reference TEXT NOT NULL,
        field TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (sweep_id, pair_id)
    );
    ALTER TABLE sweeps ADD COLUMN split_id INTEGER REFERENCES splits(id);
    UPDATE sweeps SET split_id = (SELECT r.split_id FROM runs r WHERE r.sweep_id = sweeps.id ORDER BY r.id LIMIT 1);
    INSERT INTO sweep_pairs (sweep_id, position, pair_id, question, reference, field)
        SELECT r.sweep_id, rp.position, rp.pair_id, rp.question, rp.reference, rp.field FROM run_pairs rp
        JOIN runs r ON r.id = rp.run_id WHERE r.id = (SELECT MIN(id) FROM runs WHERE sweep_id = r.sweep_id);
    """,
    # 6: a split has a validation part (choices are made on it, results reported on test); splits made before
    # have none (validation_size 0) and keep working as they were. A run records how it was chosen
    # (`selection`: the candidates and the questions the choice was made on), so that a comparison on those
    # same questions can be marked optimistic. SQLite cannot change a CHECK, so split_members is rebuilt.
    """
    ALTER TABLE splits ADD COLUMN validation_size REAL NOT NULL DEFAULT 0;
    CREATE TABLE split_members_v6 (
        split_id INTEGER NOT NULL REFERENCES splits(id) ON DELETE CASCADE,
        pair_id INTEGER NOT NULL REFERENCES pairs(id) ON DELETE CASCADE,
        part TEXT NOT NULL CHECK (part IN ('train', 'validation', 'test')),
        PRIMARY KEY (split_id, pair_id)
    );
    INSERT INTO split_members_v6 (split_id, pair_id, part) SELECT split_id, pair_id, part FROM split_members;
    DROP TABLE split_members;
    ALTER TABLE split_members_v6 RENAME TO split_members;
    ALTER TABLE runs ADD COLUMN selection TEXT NOT NULL DEFAULT '{}';
    """,
    # 7: an LLM judge's replies (core.judging), per judge stamp: pairwise, one per pair of runs, question and
    # order shown ('ab': run_a's answer first); rubric, one per run and question. A reply that did not parse is
    # kept with a NULL verdict (or scores), so that it is counted, never guessed.
    """
    CREATE TABLE judges (
        stamp TEXT PRIMARY KEY,
        config TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE judge_pairwise (
        id INTEGER PRIMARY KEY,
        stamp TEXT NOT NULL REFERENCES judges(stamp),
        pair_id INTEGER NOT NULL REFERENCES pairs(id) ON DELETE CASCADE,
        run_a INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        run_b INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        position TEXT NOT NULL CHECK (position IN ('ab', 'ba')),
        reply TEXT NOT NULL,
        verdict TEXT CHECK (verdict IN ('a', 'b', 'tie')),
        reason TEXT NOT NULL DEFAULT '',
        seconds REAL NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        CHECK (run_a < run_b),
        UNIQUE (stamp, pair_id, run_a, run_b, position)
    );
    CREATE TABLE judge_rubric (
        id INTEGER PRIMARY KEY,
        stamp TEXT NOT NULL REFERENCES judges(stamp),
        pair_id INTEGER NOT NULL REFERENCES pairs(id) ON DELETE CASCADE,
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        reply TEXT NOT NULL,
        scores TEXT,
        mean REAL,
        reason TEXT NOT NULL DEFAULT '',
        seconds REAL NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        UNIQUE (stamp, pair_id, run_id)
    );
    """,
]


def now() -> float:
    return time.time()


class Store:
    """A connection to the workspace's SQLite file, migrated to the newest schema."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else workspace.db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are opened explicitly, so nothing is left half-written
        # by an implicit BEGIN that Python's sqlite3 would otherwise insert.
        self.conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute("PRAGMA busy_timeout=30000")
        self._depth = 0
        self.migrate()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> None:
        if self.schema_version >= len(MIGRATIONS):
            return
        with self.transaction():
            # Re-read inside the write lock: another process may have migrated meanwhile.
            for number in range(self.schema_version, len(MIGRATIONS)):
                for statement in _statements(MIGRATIONS[number]):
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {number + 1}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All writes inside land together or not at all; nested uses join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield self.conn
            finally:
                self._depth -= 1
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")
        finally:
            self._depth = 0

    def query(self, sql: str, args: tuple | dict = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, args).fetchall()

    def one(self, sql: str, args: tuple | dict = ()) -> sqlite3.Row | None:
        return self.conn.execute(sql, args).fetchone()

    def one_or_raise(self, sql: str, args: tuple | dict, missing: str) -> sqlite3.Row:
        """The first row of `sql`; NotFound with the one-line message `missing` when there is none."""
        row = self.one(sql, args)
        if row is None:
            raise NotFound(missing)
        return row

    def query_in(self, sql: str, values: Sequence[Any], before: tuple = (), after: tuple = ()) -> list[sqlite3.Row]:
        """Rows of `sql`, whose one `IN ({ids})` takes every item of `values`, asked in chunks that stay under
        SQLite's limit on bound variables; `before` and `after` bind the placeholders ahead of and behind the IN.
        One list, in chunk order (an ORDER BY orders within a chunk)."""
        rows: list[sqlite3.Row] = []
        for start in range(0, len(values), IN_CHUNK):
            chunk = tuple(values[start : start + IN_CHUNK])
            rows += self.conn.execute(sql.format(ids=",".join("?" * len(chunk))), (*before, *chunk, *after)).fetchall()
        return rows

    def execute(self, sql: str, args: tuple | dict = ()) -> sqlite3.Cursor:
        """A single write statement, in its own transaction unless inside one already."""
        with self.transaction() as conn:
            return conn.execute(sql, args)

    def get_setting(self, key: str, default: Any = None) -> Any:
        row = self.one("SELECT value FROM settings WHERE key = ?", (key,))
        return json.loads(row["value"]) if row else default

    def set_setting(self, key: str, value: Any) -> None:
        self.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )


def from_row(cls: type[T], row: sqlite3.Row, json_columns: tuple[str, ...] = (), **computed: Any) -> T:
    """A dataclass from the row's columns of its fields' names (JSON columns decoded); `computed` gives the rest."""
    names = ({f.name for f in fields(cls)} - set(computed)) & set(row.keys())  # type: ignore[arg-type]
    values = {k: json.loads(row[k]) if k in json_columns else row[k] for k in names}
    return cls(**values, **computed)


def _statements(script: str) -> list[str]:
    # executescript() would COMMIT our open transaction, so statements run one by one.
    return [s.strip() for s in script.split(";") if s.strip()]
