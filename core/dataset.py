"""Datasets of question-answer pairs: import, status, split, export.

Every change here is one store transaction: an import lands whole or not at all, and a
pair's edits keep their history. Files are parsed by core.formats; this module never
reads a file format itself.

Quality flags are derived after an import has landed, by core.intake (which composes this
module with core.quality, so that this one never imports core.quality, which imports it).
Each import remembers its content's hash in the pairs' provenance, so the same file imported
again into the same dataset adds nothing (a retry never doubles a dataset).

A dataset name is a label, never part of a file path: names are restricted to a safe set of
characters, and export files get a name of their own (`download_name`).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from core import files, formats
from core.errors import BadInput, Conflict, NotFound
from core.store import Store, now

STATUSES = ("pending", "accepted", "rejected")
PARTS = ("train", "validation", "test")
PART_CHOICES = (*PARTS, "all")  # what a run, a sweep or a training may ask: one part, or every pair
# Defaults for small datasets: the validation part is what choices (a decoding configuration, a trial, a
# checkpoint) are made on, so that the test part is only reported on.
DEFAULT_TEST_SIZE = 0.2
DEFAULT_VALIDATION_SIZE = 0.1
DEFAULT_SPLIT_SEED = 42
STARTER_NAME = "starter"
STARTER_FILE = Path(__file__).resolve().parent.parent / "data" / "research_qa.csv"


@dataclass(frozen=True)
class Added:
    """What adding a file's pairs did (core.intake adds the quality flags' outcome for the import's summary)."""

    dataset: str
    path: str
    added: int
    skipped_blank: int
    imported_before: float | None = None  # when the same content was imported into this dataset (then added == 0)


@dataclass(frozen=True)
class StoredPair:
    id: int
    question: str
    answer: str
    field: str


@dataclass(frozen=True)
class SplitInfo:
    id: int
    dataset: str
    version: int
    seed: int
    test_size: float
    stratified: bool
    train: int
    test: int
    validation: int = 0
    validation_size: float = 0.0  # 0 for splits made before validation parts existed, or drawn without one

    def size(self, part: str) -> int:
        return {"train": self.train, "validation": self.validation, "test": self.test}[part]

    def describe(self) -> str:
        """'v2: 83 train / 11 validation / 23 test', or for a split without one, '... (no validation part)'."""
        if self.validation:
            return f"v{self.version}: {self.train} train / {self.validation} validation / {self.test} test"
        return f"v{self.version}: {self.train} train / {self.test} test (no validation part)"


def no_validation_message(split: SplitInfo) -> str:
    """Why a choice cannot be made on split's validation part, and what to do instead."""
    return (
        f"split v{split.version} of {split.dataset!r} has no validation part (drawn without one, or before"
        " validation parts existed): draw a new split with a validation share (Dataset page, or"
        f" `split --dataset {split.dataset} --validation-size {DEFAULT_VALIDATION_SIZE}`)"
    )


def dataset_id(store: Store, name: str) -> int:
    row = store.one("SELECT id FROM datasets WHERE name = ?", (name,))
    if row is None:
        known = ", ".join(list_datasets(store)) or "none yet"
        raise NotFound(f"no dataset named {name!r} (known: {known})")
    return row["id"]


def list_datasets(store: Store) -> list[str]:
    return [r["name"] for r in store.query("SELECT name FROM datasets ORDER BY id")]


def status_counts(store: Store, name: str) -> dict[str, int]:
    rows = store.query(
        "SELECT status, COUNT(*) AS n FROM pairs WHERE dataset_id = ? GROUP BY status",
        (dataset_id(store, name),),
    )
    counts = dict.fromkeys(STATUSES, 0)
    counts.update({r["status"]: r["n"] for r in rows})
    return counts


NAME_PUNCTUATION = " -_.,()+"  # besides letters and digits: no path separator, quote or control character
NAME_RULE = f"use 1-100 letters, digits, spaces and {' '.join(NAME_PUNCTUATION.strip())} (no leading dot, no '..')"
_NAME_CHAR = re.compile(rf"[^\W_]|[{re.escape(NAME_PUNCTUATION)}]")


def _check_name(name: str) -> None:
    """Refuse a new dataset's name unless it is plainly a label (older datasets keep the names they have)."""
    if problem := _name_problem(name):
        raise BadInput(f"dataset name {name!r} {problem}; {NAME_RULE}")


def check_target(store: Store, name: str) -> None:
    """Refuse, before any work, a dataset that would have to be created under a refused name."""
    if store.one("SELECT id FROM datasets WHERE name = ?", (name,)) is None:
        _check_name(name)


def _name_problem(name: str) -> str:
    if not name:
        return "is empty"
    if len(name) > 100:
        return "is longer than 100 characters"
    if bad := sorted({c for c in name if not _NAME_CHAR.fullmatch(c)}):
        return f"contains {', '.join(map(repr, bad))}"
    if name.startswith("."):
        return "starts with a dot"
    if ".." in name:
        return "contains '..'"
    return ""


def _name_from_file(stem: str) -> str:
    """A dataset name for a file imported without one: its name, other characters made '-'."""
    kept = "".join(c if _NAME_CHAR.fullmatch(c) else "-" for c in stem)
    return re.sub(r"\.{2,}", ".", kept).lstrip(".").strip()[:100]


def download_name(dataset: str, part: str, fmt: str) -> str:
    """A file name for an export of `dataset`, safe whatever the dataset is called (older names were unchecked)."""
    return f"{_name_from_file(dataset).replace(' ', '_') or 'dataset'}-{part}.{fmt}"


def _ensure_dataset(store: Store, name: str, source: str) -> int:
    row = store.one("SELECT id FROM datasets WHERE name = ?", (name,))
    if row:
        return row["id"]
    _check_name(name)
    new_id = store.execute(
        "INSERT INTO datasets (name, source, created_at) VALUES (?, ?, ?)", (name, source, now())
    ).lastrowid
    assert new_id is not None  # an INSERT always sets it
    return new_id


def add_pairs(
    store: Store,
    dataset: str,
    rows: list[formats.PairRow],
    status: str,
    source: str = "",
    provenance: dict | None = None,
) -> int:
    """Add pairs to a dataset (created if new) in one transaction; returns how many."""
    if status not in STATUSES:
        raise BadInput(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    dataset = dataset.strip()
    stamp = now()
    prov = json.dumps(provenance or {})
    with store.transaction() as conn:
        ds = _ensure_dataset(store, dataset, source)
        conn.executemany(
            "INSERT INTO pairs (dataset_id, question, answer, field, status, metadata, provenance,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(ds, r.question, r.answer, r.field, status, json.dumps(r.metadata), prov, stamp, stamp) for r in rows],
        )
    return len(rows)


def content_hash(rows: list[formats.PairRow]) -> str:
    """The hash of a file's pairs as imported: the same pairs give the same hash in any format or layout."""
    canonical = json.dumps([[r.question, r.answer, r.field, r.metadata] for r in rows], sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _imported_before(store: Store, dataset: str, digest: str) -> float | None:
    # An aggregate: always one row (its MIN is NULL when nothing matched).
    row = store.query(
        "SELECT MIN(p.created_at) AS at FROM pairs p JOIN datasets d ON d.id = p.dataset_id"
        " WHERE d.name = ? AND json_extract(p.provenance, '$.content_sha256') = ?",
        (dataset, digest),
    )[0]
    return row["at"]


def add_parsed(store: Store, parsed: formats.ParsedFile, dataset: str | None = None, status: str = "accepted") -> Added:
    """Add the pairs of a parsed file (see core.formats) to a dataset (named after the file by default),
    in one transaction. The same content added to the same dataset again adds nothing (`imported_before`
    says when it came)."""
    name = (dataset or _name_from_file(parsed.path.stem)).strip()
    source = str(parsed.path)
    digest = content_hash(parsed.rows)
    with store.transaction():  # the check and the insert under one write lock: two imports at once add once
        before = _imported_before(store, name, digest)
        added = 0
        if before is None:
            provenance = {"import": source, "content_sha256": digest}
            added = add_pairs(store, name, parsed.rows, status, source=source, provenance=provenance)
    return Added(name, source, added, parsed.skipped_blank, before)


def add_starter(store: Store) -> Added | None:
    """Add the shipped starter dataset on a workspace's first run (never again, even if deleted); None
    when it was added before.

    It arrives split 70/10/20 train/validation/test (seed 42), so a first sweep or training run needs no setup.
    """
    if store.get_setting("starter_imported"):
        return None
    parsed = formats.read_pairs(STARTER_FILE)
    with store.transaction():
        if store.get_setting("starter_imported"):  # the app and the CLI may start at the same moment
            return None
        added = add_pairs(
            store,
            STARTER_NAME,
            parsed.rows,
            "accepted",
            source=str(STARTER_FILE),
            provenance={"import": str(STARTER_FILE)},
        )
        store.set_setting("starter_imported", True)
        make_split(store, STARTER_NAME)
    return Added(STARTER_NAME, str(STARTER_FILE), added, parsed.skipped_blank)


REVIEW_COLUMNS = "id, question, answer, field, status, flags, duplicate_of, duplicate_score, version, updated_at"


def pairs_frame(
    store: Store,
    dataset: str,
    statuses: list[str] | None = None,
    fields: list[str] | None = None,
    flag: str | None = None,
    search: str = "",
):
    """The pairs of a dataset as a DataFrame for review, filtered in SQL; `flags` holds lists.

    `flag` is a flag name, "any" (at least one flag) or None (no filter).
    """
    import pandas as pd

    where = ["dataset_id = ?"]
    args: list[int | str] = [dataset_id(store, dataset)]
    if statuses is not None:
        where.append(f"status IN ({', '.join('?' * len(statuses))})")
        args.extend(statuses)
    if fields is not None:
        where.append(f"field IN ({', '.join('?' * len(fields))})")
        args.extend(fields)
    if flag == "any":
        where.append("flags != '[]'")
    elif flag:
        where.append("flags LIKE ?")
        args.append(f'%"{flag}"%')
    if search.strip():
        where.append("(question LIKE ? OR answer LIKE ?)")
        args.extend([f"%{search.strip()}%"] * 2)
    frame = pd.read_sql_query(
        f"SELECT {REVIEW_COLUMNS} FROM pairs WHERE {' AND '.join(where)} ORDER BY id", store.conn, params=args
    )
    frame["flags"] = [json.loads(f) for f in frame["flags"]]
    return frame


def fields_of(store: Store, dataset: str) -> list[str]:
    rows = store.query(
        "SELECT DISTINCT field FROM pairs WHERE dataset_id = ? ORDER BY field", (dataset_id(store, dataset),)
    )
    return [r["field"] for r in rows]


def get_pair(store: Store, pair_id: int) -> dict:
    row = store.one(f"SELECT {REVIEW_COLUMNS}, provenance, dataset_id FROM pairs WHERE id = ?", (pair_id,))
    if row is None:
        raise NotFound(f"no pair with id {pair_id}")
    pair = dict(row)
    pair["flags"] = json.loads(pair["flags"])
    pair["provenance"] = json.loads(pair["provenance"])
    return pair


def next_in_queue(
    store: Store,
    dataset: str,
    skipped: Collection[int] = frozenset(),
    field: str | None = None,
    flag: str | None = None,
) -> dict | None:
    """The next pending pair to review (lowest id), leaving out skipped ones."""
    frame = pairs_frame(store, dataset, ["pending"], [field] if field else None, flag)
    frame = frame[~frame["id"].isin(list(skipped))]
    return get_pair(store, int(frame["id"].iloc[0])) if len(frame) else None


EDITABLE = ("question", "answer", "field", "status")


@dataclass(frozen=True)
class Change:
    id: int
    dataset: str
    kind: str
    summary: str
    at: float
    pair_ids: list[int]


def _check_changes(changes: Mapping[str, str | None]) -> dict[str, str]:
    """The changes as stored: a cleared field becomes "", a cleared question or answer is refused."""
    if unknown := set(changes) - set(EDITABLE):
        raise BadInput(f"cannot change {', '.join(sorted(unknown))} of a pair")
    if "status" in changes and changes["status"] not in STATUSES:
        raise BadInput(f"status must be one of {', '.join(STATUSES)}")
    for col in ("question", "answer"):
        if col in changes and (changes[col] is None or not str(changes[col]).strip()):
            raise BadInput(f"the {col} cannot be empty")
    return {k: "" if v is None else str(v) for k, v in changes.items()}


def update_pairs(
    store: Store,
    edits: dict[int, dict[str, str]],
    expected_versions: dict[int, int] | None = None,
    summary: str = "",
    kind: str = "edit",
) -> int | None:
    """Apply edits to several pairs as one change (one Undo step); returns the change id.

    Every changed value is recorded in the pair's history. With `expected_versions`, an edit
    based on a stale copy (another tab changed the pair since) is refused with Conflict and
    nothing is written, instead of silently overwriting the other edit.
    """
    edits = {pid: _check_changes(changes) for pid, changes in edits.items()}

    expected_versions = expected_versions or {}
    stamp = now()
    with store.transaction() as conn:
        rows = {}
        for pair_id in edits:
            row = conn.execute("SELECT * FROM pairs WHERE id = ?", (pair_id,)).fetchone()
            if row is None:
                raise NotFound(f"no pair with id {pair_id}")
            if pair_id in expected_versions and row["version"] != expected_versions[pair_id]:
                raise Conflict(
                    f"pair {pair_id} was changed elsewhere since you opened it; reload to see the new version"
                )
            rows[pair_id] = row
        changed = {pid: {k: v for k, v in edits[pid].items() if rows[pid][k] != v} for pid in edits}
        changed = {pid: c for pid, c in changed.items() if c}
        if not changed:
            return None
        datasets = {rows[pid]["dataset_id"] for pid in changed}
        if len(datasets) > 1:
            raise BadInput("one change cannot span several datasets")
        change_id = conn.execute(
            "INSERT INTO changes (dataset_id, kind, summary, at) VALUES (?, ?, ?, ?)",
            (datasets.pop(), kind, summary or _summarise(changed), stamp),
        ).lastrowid
        for pair_id, values in changed.items():
            conn.executemany(
                "INSERT INTO pair_history (pair_id, column_name, old_value, new_value, changed_at, change_id)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(pair_id, k, rows[pair_id][k], v, stamp, change_id) for k, v in values.items()],
            )
            sets = ", ".join(f"{k} = ?" for k in values)
            conn.execute(
                f"UPDATE pairs SET {sets}, version = version + 1, updated_at = ? WHERE id = ?",
                (*values.values(), stamp, pair_id),
            )
    return change_id


def _summarise(changed: dict[int, dict[str, str]]) -> str:
    if len(changed) == 1:
        ((pair_id, values),) = changed.items()
        if set(values) == {"status"}:
            return f"pair {pair_id} {values['status']}"
        return f"pair {pair_id}: edited {', '.join(values)}"
    statuses = {v.get("status") for v in changed.values()}
    if len(statuses) == 1 and None not in statuses:
        return f"{len(changed)} pairs {statuses.pop()}"
    return f"{len(changed)} pairs edited"


def update_pair(store: Store, pair_id: int, expected_version: int | None = None, **changes: str) -> int:
    """Change question/answer/field/status of one pair (see update_pairs); returns its new version."""
    expected = {pair_id: expected_version} if expected_version is not None else None
    update_pairs(store, {pair_id: changes}, expected)
    row = store.one_or_raise("SELECT version FROM pairs WHERE id = ?", (pair_id,), f"no pair with id {pair_id}")
    return row["version"]


def set_status(store: Store, pair_ids: int | list[int], status: str) -> int | None:
    """Accept, reject or reopen one pair or many at once (one Undo step)."""
    ids = [pair_ids] if isinstance(pair_ids, int) else list(pair_ids)
    return update_pairs(store, {pid: {"status": status} for pid in ids})


def last_change(store: Store, dataset: str) -> Change | None:
    """The most recent change in a dataset that Undo would revert."""
    row = store.one(
        "SELECT * FROM changes WHERE dataset_id = ? AND kind = 'edit' AND undone = 0 ORDER BY id DESC LIMIT 1",
        (dataset_id(store, dataset),),
    )
    if row is None:
        return None
    ids = [r[0] for r in store.query("SELECT DISTINCT pair_id FROM pair_history WHERE change_id = ?", (row["id"],))]
    return Change(row["id"], dataset, row["kind"], row["summary"], row["at"], ids)


def undo_last_change(store: Store, dataset: str, expected_change_id: int | None = None) -> Change | None:
    """Revert the most recent change (recorded in history as an undo); repeated calls step further back.

    With `expected_change_id` (the change the user saw on the Undo button), a newer change made
    meanwhile elsewhere is not undone by mistake.
    """
    with store.transaction() as conn:
        change = last_change(store, dataset)
        if change is None:
            return None
        if expected_change_id is not None and change.id != expected_change_id:
            raise BadInput(f"another change was made since ({change.summary}); look again before undoing")

        history = conn.execute(
            "SELECT pair_id, column_name, old_value FROM pair_history WHERE change_id = ? ORDER BY id DESC",
            (change.id,),
        ).fetchall()
        reverts: dict[int, dict[str, str]] = defaultdict(dict)
        for h in history:
            reverts[h["pair_id"]][h["column_name"]] = h["old_value"]
        update_pairs(store, dict(reverts), summary=f"undo: {change.summary}", kind="undo")
        conn.execute("UPDATE changes SET undone = 1 WHERE id = ?", (change.id,))
    return change


def pair_history(store: Store, pair_id: int) -> list[dict]:
    rows = store.query(
        "SELECT column_name, old_value, new_value, changed_at FROM pair_history WHERE pair_id = ? ORDER BY id",
        (pair_id,),
    )
    return [dict(r) for r in rows]


def make_split(
    store: Store,
    dataset: str,
    test_size: float = DEFAULT_TEST_SIZE,
    seed: int = DEFAULT_SPLIT_SEED,
    validation_size: float = DEFAULT_VALIDATION_SIZE,
) -> SplitInfo:
    """Draw a new, frozen train/validation/test split version over the accepted pairs.

    Stratified by field: each field contributes round(n * test_size) pairs to test and round(n *
    validation_size) to validation (at least one each when it has enough pairs, and always one left to
    train), so small fields are not left out of evaluation. A validation size of 0 draws no validation part.
    Earlier versions stay untouched, so runs keep pointing at the split they used.
    """
    if not 0 < test_size < 1:
        raise BadInput(f"test size must be between 0 and 1 (exclusive), got {test_size}")
    if not 0 <= validation_size < 1 or test_size + validation_size >= 1:
        raise BadInput(
            f"validation size must be at least 0 and leave pairs to train on (test {test_size} + validation"
            f" {validation_size} must stay under 1)"
        )
    ds = dataset_id(store, dataset)
    rows = store.query("SELECT id, field FROM pairs WHERE dataset_id = ? AND status = 'accepted' ORDER BY id", (ds,))
    if len(rows) < 2:
        raise BadInput(f"dataset {dataset!r} has {len(rows)} accepted pair(s); a split needs at least 2")
    by_field: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        by_field[r["field"]].append(r["id"])
    rng = random.Random(seed)
    part_of: dict[int, str] = {}
    for field in sorted(by_field):
        ids = by_field[field]
        rng.shuffle(ids)
        n_test, n_validation = _held_out(len(ids), test_size, validation_size)
        part_of.update((i, "test") for i in ids[:n_test])
        part_of.update((i, "validation") for i in ids[n_test : n_test + n_validation])
    if "test" not in part_of.values():
        part_of[rng.choice([r["id"] for r in rows if r["id"] not in part_of])] = "test"
    with store.transaction() as conn:
        version = conn.execute(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM splits WHERE dataset_id = ?", (ds,)
        ).fetchone()[0]
        split_id = conn.execute(
            "INSERT INTO splits (dataset_id, version, seed, test_size, validation_size, stratified, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ds, version, seed, test_size, validation_size, int(len(by_field) > 1), now()),
        ).lastrowid
        assert split_id is not None  # an INSERT always sets it
        conn.executemany(
            "INSERT INTO split_members (split_id, pair_id, part) VALUES (?, ?, ?)",
            [(split_id, r["id"], part_of.get(r["id"], "train")) for r in rows],
        )
    return split_info(store, split_id)


def _held_out(n: int, test_size: float, validation_size: float) -> tuple[int, int]:
    """How many of a field's n pairs go to test and to validation: one each at least when the field has
    enough pairs for it, and at least one always left to train."""
    n_test = round(n * test_size)
    if n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    n_validation = round(n * validation_size)
    if validation_size > 0 and n >= 3:
        n_validation = max(n_validation, 1)
    return n_test, max(min(n_validation, n - n_test - 1), 0)


def split_info(store: Store, split_id: int) -> SplitInfo:
    row = store.one(
        "SELECT s.*, d.name AS dataset,"
        + ",".join(
            f" (SELECT COUNT(*) FROM split_members m WHERE m.split_id = s.id AND m.part = '{part}') AS n_{part}"
            for part in PARTS
        )
        + " FROM splits s JOIN datasets d ON d.id = s.dataset_id WHERE s.id = ?",
        (split_id,),
    )
    if row is None:
        raise NotFound(f"no split with id {split_id}")
    return SplitInfo(
        row["id"],
        row["dataset"],
        row["version"],
        row["seed"],
        row["test_size"],
        bool(row["stratified"]),
        row["n_train"],
        row["n_test"],
        row["n_validation"],
        row["validation_size"],
    )


def list_splits(store: Store, dataset: str) -> list[dict]:
    """Every split version of a dataset, newest first, with its sizes."""
    rows = store.query(
        "SELECT id FROM splits WHERE dataset_id = ? ORDER BY version DESC", (dataset_id(store, dataset),)
    )
    return [
        {
            "version": s.version,
            "train": s.train,
            "validation": s.validation,
            "test": s.test,
            "seed": s.seed,
            "validation share": s.validation_size,
            "test share": s.test_size,
            "stratified": s.stratified,
        }
        for s in (split_info(store, r["id"]) for r in rows)
    ]


def overview(store: Store) -> list[dict]:
    """One row per dataset: its pair counts per status and its latest split."""
    rows = []
    for name in list_datasets(store):
        split = latest_split(store, name)
        rows.append(
            {
                "dataset": name,
                **status_counts(store, name),
                "split": split.describe() if split else "none",
            }
        )
    return rows


def latest_split(store: Store, dataset: str) -> SplitInfo | None:
    row = store.one(
        "SELECT id FROM splits WHERE dataset_id = ? ORDER BY version DESC LIMIT 1", (dataset_id(store, dataset),)
    )
    return split_info(store, row["id"]) if row else None


def select_pairs(
    store: Store, dataset: str, part: str = "all", status: str = "accepted", split_id: int | None = None
) -> list[StoredPair]:
    """Pairs of a dataset, optionally only one part of a split (the latest unless given)."""
    if part not in PART_CHOICES:
        raise BadInput(f"split part must be train, validation, test or all, got {part!r}")
    if status not in ("all", *STATUSES):
        raise BadInput(f"status must be accepted, pending, rejected or all, got {status!r}")
    sql = "SELECT p.id, p.question, p.answer, p.field FROM pairs p"
    args: list = []
    where = ["p.dataset_id = ?"]
    args.append(dataset_id(store, dataset))
    if part != "all":
        if split_id is None:
            split = latest_split(store, dataset)
            if split is None:
                raise BadInput(f"dataset {dataset!r} has no split yet; run `split --dataset {dataset}` first")
            split_id = split.id
        sql += " JOIN split_members m ON m.pair_id = p.id AND m.split_id = ? AND m.part = ?"
        args[:0] = [split_id, part]
    if status != "all":
        where.append("p.status = ?")
        args.append(status)
    rows = store.query(f"{sql} WHERE {' AND '.join(where)} ORDER BY p.id", tuple(args))
    return [StoredPair(r["id"], r["question"], r["answer"], r["field"]) for r in rows]


def pairs_by_id(store: Store, ids: list[int]) -> list[StoredPair]:
    """The given pairs, in the given order (pairs deleted since are left out)."""
    rows = store.query_in("SELECT id, question, answer, field FROM pairs WHERE id IN ({ids})", ids)
    found = {r["id"]: StoredPair(r["id"], r["question"], r["answer"], r["field"]) for r in rows}
    return [found[i] for i in ids if i in found]


EXPORT_FORMATS = ("jsonl", "csv")


def _export_rows(store: Store, dataset: str, fmt: str, part: str, status: str) -> list[formats.PairRow]:
    if fmt not in EXPORT_FORMATS:
        raise BadInput(f"export format must be jsonl or csv, got {fmt!r}")
    return [formats.PairRow(p.question, p.answer, p.field) for p in select_pairs(store, dataset, part, status)]


def export_text(store: Store, dataset: str, fmt: str = "jsonl", part: str = "all", status: str = "accepted") -> str:
    """The pairs as the text of a JSONL or CSV file (CSV cells spreadsheet-safe, see core.formats)."""
    rows = _export_rows(store, dataset, fmt, part, status)
    out = io.StringIO(newline="")
    formats.dump_pairs(rows, fmt, out)
    return out.getvalue()


def export_pairs(
    store: Store, dataset: str, path: str | Path, fmt: str = "jsonl", part: str = "all", status: str = "accepted"
) -> int:
    """Write pairs to a JSONL or CSV file at `path` (beside it first, then renamed: never half a file);
    returns how many were written."""
    rows = _export_rows(store, dataset, fmt, part, status)
    target = Path(path)
    if not target.parent.is_dir():
        raise BadInput(f"{target}: folder {target.parent} does not exist")
    with files.replacing(target) as partial, partial.open("w", encoding="utf-8", newline="") as f:
        return formats.dump_pairs(rows, fmt, f)
