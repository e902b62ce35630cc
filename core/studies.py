"""Optuna studies in the workbench: where they are stored, opening that storage, and trials left behind.

Both Optuna integrations use it: a decoding sweep in optuna mode (core.sweep) and a hyperparameter
search over training (core.train_search). By default a study lives in the store's own SQLite file,
Optuna's tables beside ours; a search may name another storage URL (PostgreSQL, for workers on
several machines), whose password never reaches a message or a log.

Never creates or deletes a study, never draws parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from core.errors import BadInput
from core.store import Store

SQLITE_BUSY_SECONDS = 60.0  # a writer waits this long for another process's write instead of "database is locked"


def store_url(store: Store) -> str:
    """The store's own SQLite file as an Optuna storage URL."""
    return f"sqlite:///{store.path}"


def storage_url(store: Store, url: str = "") -> str:
    """The given storage URL, else the store's own file."""
    return url.strip() or store_url(store)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


@functools.lru_cache(maxsize=8)
def open_storage(url: str):
    """Optuna's RDB storage at url (cached per process); BadInput with the reason when it cannot be opened.

    SQLite: every process writing a study (workers, the job, the page) waits for another's
    write instead of failing with "database is locked"; the file is the store's, already in WAL mode.
    """
    import optuna

    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_SECONDS}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as exc:  # a bad URL, a missing driver, a refused connection
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"cannot open the Optuna storage {redact(url)}: {_scrub(reason, url)}") from None


def _scrub(text: str, url: str) -> str:
    """An error message may quote the URL (a parse error does): never its password."""
    from sqlalchemy.engine import make_url

    text = text.replace(url, redact(url))
    try:
        password = make_url(url).password
    except Exception:
        password = url.partition("@")[0].rpartition(":")[2] if "@" in url else None
    return text.replace(password, "***") if password else text


def fail_interrupted(study, alive: Callable[[Any], bool] = lambda trial: False) -> list[int]:
    """Mark the study's running trials that `alive(trial)` says nobody runs any more as failed; returns their numbers.

    A trial stays RUNNING in the storage when its process is killed; failed, it can be queued again
    (with the same parameters) and no longer counts among the trials being run. By default every
    running trial is taken for interrupted, as it is when the one process that runs trials starts again.
    """
    from optuna.trial import TrialState

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not alive(trial):
            study.tell(trial.number, state=TrialState.FAIL)
            failed.append(trial.number)
    return failed
