"""Small facts about child processes: how one ended, what it last wrote, which processes share its group.

Used by the job supervisor and the engine process alike, so a crash reads the same everywhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import psutil


def exit_reason(returncode: int | None) -> str:
    """'SIGSEGV (signal 11)' for a process killed by a signal, 'exit code 3' otherwise."""
    if returncode is not None and returncode < 0:
        try:
            return f"{signal.Signals(-returncode).name} (signal {-returncode})"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_tail(path: Path, start: int = 0, lines: int = 3) -> list[str]:
    """The last non-empty lines written to `path` after byte `start`."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (its leader may be gone, the rest still running)."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal every process of a group by its id; works after the leader died (the id stays reserved)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def last_words(path: Path, start: int = 0, lines: int = 12) -> list[str]:
    """What a process that died wrote last: from Python's fault report on, when there is one.

    faulthandler prints the most recent call first and ends with a long list of extension
    modules, so the report's head is what says where the process died.
    """
    tail = [line for line in log_tail(path, start, lines=200) if not line.startswith("Extension modules:")]
    report = next((i for i, line in enumerate(tail) if line.startswith("Fatal Python error")), None)
    return tail[report : report + lines] if report is not None else tail[-lines:]
