"""`python -m tests.benchmarks [NAME ...]`: run the named benchmarks (all without names), each `bench_NAME.py`.

Exit 0 when every one met its targets, 1 when one missed, 2 for a name that is no benchmark.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

NAMES = sorted(p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py"))


def main(argv: list[str]) -> int:
    unknown = [name for name in argv if name not in NAMES]
    if unknown:
        print(f"error: no benchmark named {', '.join(unknown)}; known: {', '.join(NAMES)}", file=sys.stderr)
        return 2
    results = [importlib.import_module(f"tests.benchmarks.bench_{name}").main() for name in argv or NAMES]
    return 0 if all(result["met"] for result in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
