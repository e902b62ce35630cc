"""The CLI as a user runs it: `python -m workbench …` in a subprocess on a real workspace."""

import json

import pytest

from tests.conftest import run_cli

MALFORMED = {
    "missing question column": ("x.csv", b"prompt,answer\nq?,a\n"),
    "empty file": ("x.csv", b""),
    "header only": ("x.csv", b"question,answer\n"),
    "binary": ("x.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    "broken quoting": ("x.csv", b'question,answer\n"what?,an answer\nq2?,a2\n'),
    "truncated json": ("x.json", b'[{"question": "q?", "answer": "a"}, {"question": '),
    "json not an array": ("x.json", b'{"question": "q?", "answer": "a"}'),
    "bad jsonl line": ("x.jsonl", b'{"question": "q?", "answer": "a"}\nnot json\n'),
    "wrong value type": ("x.jsonl", b'{"question": 42, "answer": "a"}\n'),
    "unknown extension": ("x.txt", b"question,answer\nq?,a\n"),
    "all rows blank": ("x.csv", b"question,answer\n ,a\nq?, \n"),
}


def export_all(tmp_path):
    out = tmp_path / "snapshot.jsonl"
    assert (
        run_cli("export", "--dataset", "starter", "--status", "all", "--format", "jsonl", "-o", str(out)).returncode
        == 0
    )
    datasets = run_cli("datasets", "--json")
    return out.read_text(), json.loads(datasets.stdout)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_file_exits_2_with_one_line_and_changes_nothing(case, tmp_path):
    before = export_all(tmp_path)
    name, content = MALFORMED[case]
    path = tmp_path / name
    path.write_bytes(content)
    result = run_cli("import", str(path), "--dataset", "starter")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in result.stderr
    assert export_all(tmp_path) == before


def test_import_reports_added_and_skipped_rows(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_bytes(b'\xef\xbb\xbfQuestion,ANSWER,field,source\r\nq1?,"two\r\nlines",ml,paper\r\n,blank\r\n')
    result = run_cli("import", str(path), "--status", "pending")
    assert result.returncode == 0, result.stderr
    assert "imported 1 pair(s) into 'mine' as pending, skipped 1 row(s)" in result.stdout


def test_split_then_export_each_part(tmp_path):
    result = run_cli("split", "--dataset", "starter", "--test-size", "0.2", "--seed", "3")
    assert result.returncode == 0 and "split v2" in result.stdout  # v1 came with the starter dataset
    sizes = {}
    for part in ("train", "validation", "test"):
        out = tmp_path / f"{part}.jsonl"
        assert (
            run_cli("export", "--dataset", "starter", "--split", part, "--format", "jsonl", "-o", str(out)).returncode
            == 0
        )
        sizes[part] = len(out.read_text().splitlines())
    assert f"{sizes['train']} train / {sizes['validation']} validation / {sizes['test']} test" in result.stdout


def test_bad_flags_exit_2_without_traceback():
    for args in (
        ["split", "--dataset", "nope"],
        ["split", "--dataset", "starter", "--test-size", "1.5"],
        ["export", "--dataset", "nope", "--split", "test", "-o", "/tmp/x.jsonl"],
        ["train", "--dataset", "starter", "--learning-rate", "0"],
        ["train", "--dataset", "starter", "--lora-r", "0"],
        ["evaluate", "--adapter", "/nowhere"],
        ["import"],
        ["resume", "999"],
        ["confirm", "999"],
        ["sweep", "--dataset", "starter", "--grid", "temperature=0", "--split", "everything"],
    ):
        result = run_cli(*args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) >= 1


def test_runs_lists_nothing_on_a_fresh_workspace():
    result = run_cli("runs", "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == []


def test_every_subcommand_documents_every_option():
    from workbench.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"import", "export", "split", "runs", "jobs", "cancel", "resume"} <= set(sub.choices)
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.dest} has no help"
    assert run_cli("--help").returncode == 0
    assert "--test-size" in run_cli("split", "--help").stdout
