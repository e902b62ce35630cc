"""Runs: one backend + model + adapter + decoding parameters applied to one slice of a dataset.

A run is stamped with everything needed to reproduce it (split version, model fingerprint,
prompt template, parameters, and its questions with the question and reference texts frozen when
it is made, `run_pairs`); its generations and scores hang off it. Making a run does its slow part
(hashing the model file) before its quick write (`prepare_run`, then `record_run`), so a caller
can put that write in its own transaction without holding the store's write lock for long. This module records
and lists runs; producing answers is core.generation, scoring is core.scoring.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import dataset as ds
from core import settings
from core.decoding import DecodingParams
from core.errors import BadInput, NotFound
from core.prompting import DEFAULT_TEMPLATE, check_template
from core.store import Store, from_row, now


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    backend: str
    model: str = ""
    params: DecodingParams = field(default_factory=DecodingParams)
    part: str = "test"
    kind: str = "decoding"
    adapter: str = ""
    prompt_template: str = DEFAULT_TEMPLATE
    label: str = ""
    limit: int | None = None
    repeats: int = 1
    backend_options: dict[str, Any] = field(default_factory=dict)
    scorer: str = ""  # the scorer stamp its answers are scored with (empty: not scored)
    split_id: int | None = None  # a given split version (e.g. the one an adapter was trained on); None: the latest
    selection: dict[str, Any] = field(default_factory=dict)  # how it was chosen, see `Run.selection`


@dataclass(frozen=True)
class Run:
    id: int
    kind: str
    label: str
    dataset: str
    split_id: int | None
    split_version: int | None
    part: str
    backend: str
    model: str
    model_hash: str
    adapter: str
    params: DecodingParams
    prompt_template: str
    config: dict[str, Any]
    job_id: int | None
    created_at: float
    sweep_id: int | None = None
    scorer: str = ""
    # How this run's settings were chosen, when they were chosen among candidates: {"how": a sentence,
    # "candidates": N, "split_id": S, "part": the part chosen on, "pair_ids": the questions the choice was
    # made on}. Empty for a run nobody chose (one configuration, one training run).
    selection: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSummary:
    run: Run
    n_answers: int
    n_scored: int
    mean_f1: float | None
    median_f1: float | None


def model_fingerprint(store: Store, model: str) -> str:
    """sha256 of a model file (cached by size and mtime); for folders, of their config and weights' sizes."""
    path = Path(model)
    if not path.exists():
        return ""
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(path.iterdir()):
            if f.is_file():
                digest.update(f"{f.name}:{f.stat().st_size}".encode())
                if f.suffix == ".json":
                    digest.update(f.read_bytes())
        return "dir-sha256:" + digest.hexdigest()[:16]
    stat = path.stat()
    key = f"hash:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if cached := store.get_setting(key):
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    value = "sha256:" + digest.hexdigest()[:16]
    store.set_setting(key, value)
    return value


def check_spec(store: Store, spec: RunSpec) -> tuple[str, ds.SplitInfo | None]:
    """Refuse a run that cannot work (before anything is written); returns its model and split."""
    check_template(spec.prompt_template)
    if spec.part not in ("all", *ds.PARTS):
        raise BadInput(f"part must be train, validation, test or all, got {spec.part!r}")
    if spec.repeats < 1:
        raise BadInput("repeats must be at least 1")
    if spec.limit is not None and spec.limit < 1:
        raise BadInput("limit must be at least 1")
    ds.dataset_id(store, spec.dataset)
    split = _split_of(store, spec) if spec.part != "all" else None
    if spec.part != "all" and split is None:
        raise BadInput(f"dataset {spec.dataset!r} has no split yet; run `split --dataset {spec.dataset}` first")
    if split is not None and split.size(spec.part) == 0:
        if spec.part == "validation":
            raise BadInput(ds.no_validation_message(split))
        raise BadInput(f"the {spec.part} part of {spec.dataset!r} split v{split.version} is empty")
    return settings.resolve_generator(store, spec.backend, spec.model), split


def _split_of(store: Store, spec: RunSpec) -> ds.SplitInfo | None:
    if spec.split_id is None:
        return ds.latest_split(store, spec.dataset)
    split = ds.split_info(store, spec.split_id)
    if split.dataset != spec.dataset:
        raise BadInput(f"split {spec.split_id} belongs to dataset {split.dataset!r}, not {spec.dataset!r}")
    return split


@dataclass(frozen=True)
class Prepared:
    """What a run is made from, found before anything is written: its model (hashed: the slow part, kept
    out of any write transaction), its split, and its questions with the texts they have now."""

    model: str
    model_hash: str
    split: ds.SplitInfo | None
    pairs: list[ds.StoredPair]


def prepare_run(store: Store, spec: RunSpec) -> Prepared:
    """Check a run and do its slow part (hashing a possibly multi-GB model file); writes nothing but that hash."""
    model, split = check_spec(store, spec)
    pairs = ds.select_pairs(store, spec.dataset, spec.part, "accepted", split_id=split.id if split else None)
    pairs = pairs[: spec.limit] if spec.limit else pairs
    if not pairs:
        raise BadInput(f"dataset {spec.dataset!r} has no accepted pairs in part {spec.part!r}")
    return Prepared(model, model_fingerprint(store, model), split, pairs)


def engine_stamp(store: Store, spec: RunSpec) -> dict[str, Any]:
    """How the embedded engine decodes a run's answers, recorded with it (batched decoding is not bit-identical
    to one sequence at a time, so runs say which they are) and followed when it is resumed."""
    if spec.backend != "llamacpp":
        return {}
    parallel = int(spec.backend_options.get("parallel") or settings.load(store).llamacpp_parallel)
    return {"engine": {"mode": "batched" if parallel > 1 else "single-stream", "parallel": parallel}}


def engine_mode(run: Run) -> str:
    """'batched x16', 'single-stream' (the embedded engine's runs), '' for other backends."""
    stamp = run.config.get("engine")
    if not stamp:
        return "single-stream" if run.backend == "llamacpp" else ""
    return f"batched x{stamp['parallel']}" if stamp["mode"] == "batched" else "single-stream"


def record_run(
    store: Store,
    spec: RunSpec,
    prepared: Prepared,
    sweep_id: int | None = None,
    job_id: int | None = None,
    extra_config: dict[str, Any] | None = None,
) -> int:
    """Insert a prepared run with its questions' texts frozen; quick, so it may join the caller's transaction."""
    config = {
        "limit": spec.limit,
        "repeats": spec.repeats,
        "backend_options": spec.backend_options,
        **engine_stamp(store, spec),
    }
    with store.transaction() as conn:
        run_id = conn.execute(
            "INSERT INTO runs (kind, label, dataset_id, split_id, part, backend, model, model_hash, adapter, params,"
            " prompt_template, config, scorer, sweep_id, job_id, selection, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                spec.kind,
                spec.label,
                ds.dataset_id(store, spec.dataset),
                prepared.split.id if prepared.split else None,
                spec.part,
                spec.backend,
                prepared.model,
                prepared.model_hash,
                spec.adapter,
                json.dumps(spec.params.to_dict()),
                spec.prompt_template,
                json.dumps({**config, **(extra_config or {})}),
                spec.scorer,
                sweep_id,
                job_id,
                json.dumps(spec.selection),
                now(),
            ),
        ).lastrowid
        assert run_id is not None  # an INSERT always sets it
        freeze_pairs(store, "run", run_id, prepared.pairs)
    return run_id


def create_run(store: Store, spec: RunSpec) -> int:
    """Record a run; its questions and their texts are fixed now, so reruns and edits see the same questions."""
    return record_run(store, spec, prepare_run(store, spec))


# A run's questions (and a sweep's, for the runs it makes later) with the texts they had when it was made.
_FROZEN_TABLES = {"run": "run_pairs", "sweep": "sweep_pairs"}


def freeze_pairs(store: Store, owner: str, owner_id: int, pairs: list[ds.StoredPair]) -> None:
    """Keep these pairs' texts as they are now for a run or a sweep (`owner`)."""
    with store.transaction() as conn:
        conn.executemany(
            f"INSERT INTO {_FROZEN_TABLES[owner]} ({owner}_id, position, pair_id, question, reference, field)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(owner_id, i, p.id, p.question, p.answer, p.field) for i, p in enumerate(pairs)],
        )


def frozen_pairs(store: Store, owner: str, owner_id: int) -> list[ds.StoredPair]:
    """The pairs a run or a sweep froze, in their order, with the texts frozen (`answer` is the reference)."""
    rows = store.query(
        f"SELECT pair_id, question, reference, field FROM {_FROZEN_TABLES[owner]} WHERE {owner}_id = ?"
        " ORDER BY position",
        (owner_id,),
    )
    return [ds.StoredPair(r["pair_id"], r["question"], r["reference"], r["field"]) for r in rows]


_RUN_SQL = (
    "SELECT r.*, d.name AS dataset, s.version AS split_version FROM runs r"
    " JOIN datasets d ON d.id = r.dataset_id LEFT JOIN splits s ON s.id = r.split_id"
)


def _to_run(row: Any) -> Run:
    return from_row(Run, row, ("config", "selection"), params=DecodingParams(**json.loads(row["params"])))


def run_exists(store: Store, run_id: int) -> bool:
    return store.one("SELECT 1 FROM runs WHERE id = ?", (run_id,)) is not None


def get_run(store: Store, run_id: int) -> Run:
    row = store.one(_RUN_SQL + " WHERE r.id = ?", (run_id,))
    if row is None:
        raise NotFound(f"no run with id {run_id}")
    return _to_run(row)


def first_answers(store: Store, run_id: int) -> dict[int, str]:
    """A run's answer to each of its questions, its first repeat's (what raters and judges are shown)."""
    rows = store.query(
        "SELECT pair_id, answer FROM generations g WHERE run_id = ?"
        " AND repeat = (SELECT MIN(repeat) FROM generations WHERE run_id = g.run_id AND pair_id = g.pair_id)",
        (run_id,),
    )
    return {r["pair_id"]: r["answer"] for r in rows}


def run_pairs(store: Store, run: Run) -> list[ds.StoredPair]:
    """The questions a run asks and the references it is scored on: fixed when it was created, whatever
    is edited, accepted or rejected later."""
    return frozen_pairs(store, "run", run.id)


def list_runs(store: Store) -> list[RunSummary]:
    stats = {
        r["run_id"]: r
        for r in store.query(
            "SELECT g.run_id, COUNT(DISTINCT g.id) AS n_answers, COUNT(s.id) AS n_scored"
            " FROM generations g JOIN runs r ON r.id = g.run_id"
            " LEFT JOIN scores s ON s.generation_id = g.id AND s.scorer = r.scorer GROUP BY g.run_id"
        )
    }
    f1s: dict[int, list[float]] = {}
    for r in store.query(
        # Only scores with the run's own scorer stamp: numbers from different scorers never mix.
        "SELECT g.run_id, s.f1 FROM scores s JOIN generations g ON g.id = s.generation_id"
        " JOIN runs r ON r.id = g.run_id AND s.scorer = r.scorer WHERE s.f1 IS NOT NULL"
    ):
        f1s.setdefault(r["run_id"], []).append(r["f1"])
    out = []
    for row in store.query(_RUN_SQL + " ORDER BY r.id"):
        run = _to_run(row)
        values = sorted(f1s.get(run.id, []))
        stat = stats.get(run.id)
        out.append(
            RunSummary(
                run,
                stat["n_answers"] if stat else 0,
                stat["n_scored"] if stat else 0,
                sum(values) / len(values) if values else None,
                _median(values) if values else None,
            )
        )
    return out


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else (sorted_values[mid - 1] + sorted_values[mid]) / 2


def describe_params(params: DecodingParams) -> str:
    return " ".join(f"{k}={v}" for k, v in params.to_dict().items() if v is not None)
