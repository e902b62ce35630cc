"""Importing pairs: a file's pairs (or the starter dataset) into a dataset, then the dataset's quality flags.

The one place that composes core.dataset (the pairs, one transaction) with core.quality (the flags), so
that core.dataset never imports core.quality (which imports core.dataset). The CLI's `import`, the
Dataset page and the workspace's first run come through here.

Quality flags are derived after an import has landed: a failure there (no scorer model, no memory)
leaves the pairs imported and reported with their flags pending, never half-undone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from core import dataset as ds
from core import formats, quality
from core.errors import WorkbenchError
from core.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportSummary:
    dataset: str
    path: str
    added: int
    skipped_blank: int
    status: str
    imported_before: float | None = None  # when the same content was imported into this dataset (then added == 0)
    flags_pending: str = ""  # why quality flags could not be computed ("" when they were)


def import_parsed(
    store: Store, parsed: formats.ParsedFile, dataset: str | None = None, status: str = "accepted"
) -> ImportSummary:
    """Add the pairs of a parsed file (see core.formats) to a dataset in one transaction, then flag them.

    The same content imported into the same dataset again adds nothing (`imported_before` says when it
    came); either way the dataset's flags are recomputed, and a failure there leaves them pending.
    """
    added = ds.add_parsed(store, parsed, dataset, status)
    return _summary(added, status, flag_after_import(store, added.dataset))


def import_file(store: Store, path: str | Path, dataset: str | None = None, status: str = "accepted") -> ImportSummary:
    """Parse a CSV/JSON/JSONL file and add its pairs; a bad file changes nothing."""
    return import_parsed(store, formats.read_pairs(path), dataset, status)


def ensure_starter(store: Store) -> ImportSummary | None:
    """Import the shipped starter dataset on a workspace's first run (never again, even if deleted), split
    70/10/20 (see dataset.add_starter), and flag it; None when it was imported before."""
    added = ds.add_starter(store)
    if added is None:
        return None
    # after the commit: loading the embedding model must not hold the write lock
    return _summary(added, "accepted", flag_after_import(store, added.dataset))


def _summary(added: ds.Added, status: str, flags_pending: str) -> ImportSummary:
    return ImportSummary(
        added.dataset, added.path, added.added, added.skipped_blank, status, added.imported_before, flags_pending
    )


def flag_after_import(store: Store, name: str) -> str:
    """Recompute a dataset's quality flags; "" when done, else why they are pending (the pairs stay).

    Flags are hints derived from the pairs, recomputed from scratch by any later re-flag, so no
    failure of the flagger (a missing or broken scorer model, memory) may undo or fail an import.
    """
    try:
        quality.flag_dataset(store, name)  # loads the embedding model only now that pairs arrived
    except Exception as exc:  # any failure leaves the flags pending (see the docstring)
        # the user gets the reason; the traceback only where logging is set up (never on the CLI's stderr)
        log.info("quality flags of dataset %r not computed", name, exc_info=True)
        text = str(exc).splitlines()[0] if str(exc) else ""
        if isinstance(exc, WorkbenchError):
            return text
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return ""


def describe_import(summary: ImportSummary) -> str:
    if summary.imported_before is not None:
        when = datetime.fromtimestamp(summary.imported_before).strftime("%Y-%m-%d %H:%M")
        return f"{summary.path}: the same pairs were already imported into {summary.dataset!r} on {when}; added none"
    skipped = summary.skipped_blank
    blank = f", skipped {skipped} row(s) with a blank question or answer" if skipped else ""
    return f"imported {summary.added} pair(s) into {summary.dataset!r} as {summary.status}{blank}"


def describe_pending_flags(summary: ImportSummary) -> str:
    """The warning for an import whose flags could not be computed ("" when they were)."""
    if not summary.flags_pending:
        return ""
    return (
        f"quality flags of {summary.dataset!r} are pending ({summary.flags_pending}); the pairs are kept."
        " Re-flag on the Dataset page (Quality flags) or import the same file again once that is fixed"
    )
