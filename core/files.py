"""Writing files and folders so that a reader, or a kill -9, never sees half of one.

Everything is written beside its target (`NAME.part`) and renamed into place in one step: the target
is either the old complete version, the new complete version, or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def replacing(target: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield the path to write (a file or a folder) in place of `target`; renamed onto it when the block succeeds,
    removed when it fails. `durable` fsyncs the written file and the folder entry (a checkpoint, not a cache)."""
    target = Path(target).resolve() if Path(target).is_symlink() else Path(target)  # a link stays a link
    if target.exists() and not (target.is_file() or target.is_dir()):
        yield target  # a device or a pipe (-o /dev/stdout): there is nothing to replace, only to write to
        return
    part = target.with_name(target.name + ".part")
    _remove(part)  # a leftover of a killed writer
    try:
        yield part
        if durable and part.is_file():
            fsync(part)
        if part.is_dir() and target.exists():
            _remove(target)  # os.replace cannot replace a non-empty folder
        os.replace(part, target)
        if durable:
            fsync(target.parent)
    except BaseException:
        _remove(part)
        raise


def write_text(target: str | Path, text: str, *, durable: bool = False) -> Path:
    with replacing(target, durable=durable) as part:
        part.write_text(text)
    return Path(target)


def write_bytes(target: str | Path, data: bytes, *, durable: bool = False) -> Path:
    with replacing(target, durable=durable) as part:
        part.write_bytes(data)
    return Path(target)


def write_json(target: str | Path, value: Any, *, durable: bool = False) -> Path:
    return write_text(target, json.dumps(value, indent=2), durable=durable)


def fsync(path: str | Path) -> None:
    """Flush a file, or a folder's entries, to the disk (a rename is only durable once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
