"""Shared by every benchmark: timing, the machine's description and the report format (DESIGN.md)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

from core import workspace


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


@contextlib.contextmanager
def scratch_workspace() -> Iterator[str]:
    """A fresh $WORKBENCH_HOME for one benchmark, still using the prepared embedded models; restored after."""
    previous = os.environ.get("WORKBENCH_HOME")
    os.environ.setdefault("WORKBENCH_MODELS", str(workspace.models_dir()))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["WORKBENCH_HOME"] = tmp
        try:
            yield tmp
        finally:
            if previous is None:
                os.environ.pop("WORKBENCH_HOME")
            else:
                os.environ["WORKBENCH_HOME"] = previous


def timed(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn` in seconds over `repeat` runs, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def met(value: float, target: str) -> bool:
    op, bound = (target[:2], target[2:]) if target[:2] in (">=", "<=") else (target[:1], target[1:])
    bound_value = float(bound)
    return {">=": value >= bound_value, "<=": value <= bound_value, ">": value > bound_value, "<": value < bound_value}[
        op
    ]


def report(name: str, figures: dict[str, float], ratios: dict[str, float], targets: dict[str, str]) -> dict:
    """Print a small table and write $WORKBENCH_HOME/bench/<name>.json; targets may name figures or ratios."""
    values = {**figures, **ratios}
    result = {
        "name": name,
        "machine": machine(),
        "figures": {k: round(v, 4) for k, v in figures.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": targets,
        "met": all(met(values[k], t) for k, t in targets.items()),
    }
    out = workspace.home() / "bench" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    width = max(len(k) for k in values)
    print(f"\n{name}  ({result['machine']})")
    for key, value in values.items():
        target = targets.get(key, "")
        mark = ("ok" if met(value, target) else "MISSED") if target else ""
        print(f"  {key:<{width}}  {value:>12.3f}  {target:>8}  {mark}")
    print(f"  -> {out}")
    return result
