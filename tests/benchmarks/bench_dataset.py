"""Review at scale: loading the review table and saving one edit with 10,000 pairs in a dataset.

Baselines on the same SQLite file: a plain `SELECT … fetchall()` of the same rows, and a plain
`UPDATE … COMMIT`. The workbench adds filtering, flag parsing, a DataFrame and the history row.
"""

from __future__ import annotations

import os
import random
import sqlite3
import tempfile
from pathlib import Path

from core import dataset, formats
from core.store import Store
from tests.benchmarks.common import report, timed

N_PAIRS = 10_000
ROOT = Path(__file__).resolve().parents[2]


def make_pairs(n: int) -> list[formats.PairRow]:
    rng = random.Random(0)
    words = "model data baseline seed metric split error variance bias sample test train method result".split()
    return [
        formats.PairRow(
            f"Question {i}: how should one {' '.join(rng.choices(words, k=8))}?",
            " ".join(rng.choices(words, k=60)) + ".",
            rng.choice(["ml", "nlp", "systems", "hci"]),
        )
        for i in range(n)
    ]


def page_render_s(home: str) -> float:
    """Server-side time of one run of the Dataset page (Streamlit's AppTest) on this workspace."""
    from streamlit.testing.v1 import AppTest

    previous = os.environ.get("WORKBENCH_HOME")
    os.environ["WORKBENCH_HOME"] = home
    try:
        app = AppTest.from_file(str(ROOT / "workbench" / "app.py"), default_timeout=120)
        app.query_params["dataset"] = "big"

        def render() -> None:
            app.switch_page("../pages/dataset.py").run()
            assert not app.exception, app.exception

        return timed(render, repeat=3)
    finally:
        if previous is None:
            os.environ.pop("WORKBENCH_HOME")
        else:
            os.environ["WORKBENCH_HOME"] = previous


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(os.path.join(tmp, "workbench.sqlite"))
        dataset.add_pairs(store, "big", make_pairs(N_PAIRS), "pending")
        ids = [int(i) for i in dataset.pairs_frame(store, "big")["id"]]
        rng = random.Random(1)

        load_s = timed(lambda: dataset.pairs_frame(store, "big"))
        queue_s = timed(lambda: dataset.next_in_queue(store, "big"))
        raw = sqlite3.connect(store.path)
        raw.execute("PRAGMA synchronous=NORMAL")  # the store's own durability setting, for a fair baseline
        raw_load_s = timed(lambda: raw.execute(f"SELECT {dataset.REVIEW_COLUMNS} FROM pairs").fetchall())

        counter = iter(range(10**9))
        save_s = timed(lambda: dataset.update_pair(store, rng.choice(ids), answer=f"edited {next(counter)}"), 20)

        def raw_save() -> None:
            raw.execute("UPDATE pairs SET answer = ? WHERE id = ?", (f"raw {next(counter)}", rng.choice(ids)))
            raw.commit()

        raw_save_s = timed(raw_save, 20)
        raw.close()
        store.set_setting("starter_imported", True)  # keep the page on the 10,000 pairs
        store.close()
        page_s = page_render_s(tmp)
    ms = 1000.0
    return report(
        "dataset_review",
        figures={
            "review_table_load_ms": load_s * ms,
            "dataset_page_run_ms": page_s * ms,
            "next_in_queue_ms": queue_s * ms,
            "raw_select_ms": raw_load_s * ms,
            "save_one_edit_ms": save_s * ms,
            "raw_update_ms": raw_save_s * ms,
        },
        ratios={"load_vs_raw_select": load_s / raw_load_s, "save_vs_raw_update": save_s / raw_save_s},
        targets={"review_table_load_ms": "<1000", "dataset_page_run_ms": "<1000", "save_one_edit_ms": "<100"},
    )


if __name__ == "__main__":
    main()
