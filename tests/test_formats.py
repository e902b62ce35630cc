"""What `core.formats` accepts, what it refuses and with which message, and what it writes."""

import json
from pathlib import Path

import pytest

from core.errors import BadInput
from core.formats import PairRow, read_pairs, write_csv, write_jsonl


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def pairs(parsed) -> list[tuple[str, str, str]]:
    return [(row.question, row.answer, row.field) for row in parsed.rows]


# --- CSV -----------------------------------------------------------------------------------


def test_csv_with_header_question_answer_field(tmp_path):
    parsed = read_pairs(write(tmp_path, "p.csv", b"question,answer,field\nWhat is H2O?,Water,chemistry\n"))
    assert parsed.format == "csv"
    assert parsed.path == tmp_path / "p.csv"
    assert parsed.rows == [PairRow("What is H2O?", "Water", "chemistry")]
    assert parsed.skipped_blank == 0


def test_csv_field_column_is_optional(tmp_path):
    parsed = read_pairs(write(tmp_path, "p.csv", b"question,answer\nq,a\n"))
    assert parsed.rows == [PairRow("q", "a", "")]


def test_csv_utf8_bom_and_crlf_line_endings(tmp_path):
    content = "question,answer\r\nCafé?,Oui\r\n".encode("utf-8-sig")
    assert pairs(read_pairs(write(tmp_path, "p.csv", content))) == [("Café?", "Oui", "")]


def test_csv_quoted_field_may_span_lines_and_hold_commas_and_quotes(tmp_path):
    content = b'question,answer\n"Two, lines?","first\nsecond ""quoted"""\n'
    assert pairs(read_pairs(write(tmp_path, "p.csv", content))) == [("Two, lines?", 'first\nsecond "quoted"', "")]


def test_csv_header_names_match_in_any_case_and_spacing(tmp_path):
    parsed = read_pairs(write(tmp_path, "p.csv", b"Question, ANSWER ,Field\nq,a,bio\n"))
    assert parsed.rows == [PairRow("q", "a", "bio")]


def test_csv_extra_columns_go_to_metadata_under_stripped_header_names(tmp_path):
    parsed = read_pairs(write(tmp_path, "p.csv", b"id,question,answer, Source \n7,q,a,wiki\n"))
    assert parsed.rows == [PairRow("q", "a", "", {"id": "7", "Source": "wiki"})]


def test_values_are_stripped_of_surrounding_whitespace(tmp_path):
    parsed = read_pairs(write(tmp_path, "p.csv", b'question,answer,field\n  q ,"  a\n", bio \n'))
    assert pairs(parsed) == [("q", "a", "bio")]


def test_csv_blank_lines_are_ignored_and_blank_pairs_skipped_and_counted(tmp_path):
    content = b"question,answer\n\nq1,a1\n   ,a2\nq3,\nq4\n,\nq5,a5\n"
    parsed = read_pairs(write(tmp_path, "p.csv", content))
    assert pairs(parsed) == [("q1", "a1", ""), ("q5", "a5", "")]
    assert parsed.skipped_blank == 4  # blank question, blank answer, missing answer, all blank


# --- JSON and JSONL ------------------------------------------------------------------------


def test_json_array_of_objects_with_keys_in_any_case_and_extras_in_metadata(tmp_path):
    content = json.dumps(
        [
            {"Question": "q1", "ANSWER": "a1", "Field": "bio", "source": "wiki", "tags": ["x"]},
            {"question": "q2", "answer": "a2", "field": None},
            {"question": "q3", "answer": "a3"},
        ]
    ).encode()
    parsed = read_pairs(write(tmp_path, "p.json", content))
    assert parsed.format == "json"
    assert parsed.rows == [
        PairRow("q1", "a1", "bio", {"source": "wiki", "tags": ["x"]}),
        PairRow("q2", "a2", ""),
        PairRow("q3", "a3", ""),
    ]


@pytest.mark.parametrize("name", ["p.jsonl", "p.ndjson", "P.JSONL"])
def test_jsonl_one_object_per_line_blank_lines_allowed(tmp_path, name):
    content = b'{"question": "q1", "answer": "a1", "id": 1}\n\n  \r\n{"question": "q2", "answer": "a2"}'
    parsed = read_pairs(write(tmp_path, name, content))
    assert parsed.format == "jsonl"
    assert parsed.rows == [PairRow("q1", "a1", "", {"id": 1}), PairRow("q2", "a2", "")]


def test_json_blank_pairs_skipped_and_counted(tmp_path):
    content = b'[{"question": "q", "answer": "a"}, {"question": " ", "answer": "a"}, {"answer": "a"}]'
    parsed = read_pairs(write(tmp_path, "p.json", content))
    assert pairs(parsed) == [("q", "a", "")]
    assert parsed.skipped_blank == 2  # a missing question counts as blank


# --- refusals ------------------------------------------------------------------------------


def assert_refused(path: Path, *phrases: str) -> None:
    with pytest.raises(BadInput) as caught:
        read_pairs(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    for phrase in phrases:
        assert phrase in message


def test_refuses_missing_file(tmp_path):
    assert_refused(tmp_path / "nope.csv", "does not exist")


def test_refuses_directory(tmp_path):
    (tmp_path / "dir.csv").mkdir()
    assert_refused(tmp_path / "dir.csv", "not a regular file")


@pytest.mark.parametrize(
    ("name", "content", "phrases"),
    [
        pytest.param("p.txt", b"question,answer\nq,a\n", ["unsupported file extension '.txt'"], id="unknown-extension"),
        pytest.param("p.csv", b"", ["file is empty"], id="empty"),
        pytest.param("p.jsonl", b" \n\r\n\t", ["file is empty"], id="whitespace-only"),
        pytest.param("p.csv", b"question,answer\nq\x00,a\n", ["not a UTF-8 text file"], id="nul-byte"),
        pytest.param("p.csv", "question,answer\ncafé,a\n".encode("latin-1"), ["not a UTF-8 text file"], id="latin-1"),
        pytest.param("p.json", "[]".encode("utf-16"), ["not a UTF-8 text file"], id="utf-16"),
        # CSV
        pytest.param("p.csv", b"question,answer\r\n\r\n", ["header but no rows"], id="csv-header-only"),
        pytest.param(
            "p.csv",
            b"question,reply\nq,a\n",
            ["no 'answer' column", "found columns: 'question', 'reply'"],
            id="csv-no-answer-column",
        ),
        pytest.param(
            "p.csv",
            b"q;a\nx;y\n",
            ["no 'question' or 'answer' column", "found columns: 'q;a'"],
            id="csv-wrong-delimiter",
        ),
        pytest.param(
            "p.csv",
            b"Question,answer, question\nq,a,b\n",
            ["line 1", "'question' given more than once"],
            id="csv-repeated-column",
        ),
        pytest.param(
            "p.csv",
            b'question,answer\nq1,a1\n"q2,a2\nq3,a3\n',
            ["line 3", "broken CSV quoting", "unterminated"],
            id="csv-unterminated-quote",
        ),
        pytest.param(
            "p.csv",
            b'question,answer\n"q1,a1\nq2,"a2"\n',
            ["line 2", "broken CSV quoting"],
            id="csv-quote-closed-later",
        ),
        pytest.param(
            "p.csv",
            b'question,answer\n"q1" oops,a1\n',
            ["line 2", "broken CSV quoting"],
            id="csv-text-after-closing-quote",
        ),
        pytest.param(
            "p.csv",
            b"question,answer\nq1,a1\nq2,a2,a3\n",
            ["line 3", "more fields than the header (3 > 2)"],
            id="csv-too-many-fields",
        ),
        pytest.param(
            "p.csv",
            b'question,answer\n"multi\r\nline",a\r\nq,a,x\r\n',
            ["line 4", "more fields than the header"],
            id="csv-line-after-multiline-field",
        ),
        pytest.param(
            "p.csv",
            b"question,answer\n ,a\nq,\t\n",
            ["no usable rows (2 skipped for blank question or answer)"],
            id="csv-all-blank",
        ),
        # JSON
        pytest.param(
            "p.json",
            b'[{"question": "q", "answer": "a"},\n {"question": "q2"',
            ["line 2, column 19", "invalid JSON"],
            id="json-truncated",
        ),
        pytest.param(
            "p.json",
            b'{"question": "q", "answer": "a"}',
            ["expected a JSON array of objects, got an object"],
            id="json-object-not-array",
        ),
        pytest.param(
            "p.json",
            b'[{"question": "q", "answer": "a"}, "q2"]',
            ["index 1", "expected a JSON object, got a string"],
            id="json-non-object-item",
        ),
        pytest.param(
            "p.json",
            b'[{"question": 42, "answer": "a"}]',
            ["index 0", "'question' must be a string, got a number"],
            id="json-number-question",
        ),
        pytest.param(
            "p.json",
            b'[{"question": "q", "answer": null}]',
            ["index 0", "'answer' must be a string, got null"],
            id="json-null-answer",
        ),
        pytest.param(
            "p.json",
            b'[{"question": "q", "answer": "a", "field": ["x"]}]',
            ["'field' must be a string, got an array"],
            id="json-array-field",
        ),
        pytest.param(
            "p.json",
            b'[{"question": "q", "answer": "a", "Answer": "b"}]',
            ["index 0", "'answer' given more than once"],
            id="json-repeated-key",
        ),
        pytest.param("p.json", b"[]", ["no usable rows (0 skipped"], id="json-empty-array"),
        pytest.param(
            "p.json", b'[{"question": "", "answer": "a"}]', ["no usable rows (1 skipped"], id="json-all-blank"
        ),
        # JSONL
        pytest.param(
            "p.jsonl",
            b'{"question": "q", "answer": "a"}\n\n{"question": "q2",\n',
            ["line 3", "invalid JSON"],
            id="jsonl-invalid-line",
        ),
        pytest.param(
            "p.jsonl",
            b'{"question": "q", "answer": "a"}\n[1, 2]\n',
            ["line 2", "expected a JSON object, got an array"],
            id="jsonl-non-object-line",
        ),
        pytest.param(
            "p.jsonl",
            b'{"question": "q", "answer": true}\n',
            ["line 1", "'answer' must be a string, got a boolean"],
            id="jsonl-boolean-answer",
        ),
    ],
)
def test_refusals_name_the_file_and_problem_on_one_line(tmp_path, name, content, phrases):
    assert_refused(write(tmp_path, name, content), *phrases)


# --- writing -------------------------------------------------------------------------------

ROWS = [
    PairRow("Café, or tea?", 'Both "kinds"\nsecond line', "food", {"id": 3}),
    {"question": "Ünïcode?", "answer": "是", "field": None},
]


def test_write_jsonl_writes_one_plain_object_per_line_and_reads_back(tmp_path):
    path = tmp_path / "out.jsonl"
    assert write_jsonl(ROWS, path) == 2
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"question": "Café, or tea?", "answer": 'Both "kinds"\nsecond line', "field": "food"},
        {"question": "Ünïcode?", "answer": "是", "field": ""},
    ]
    assert "是" in lines[1]  # not \u-escaped
    assert pairs(read_pairs(path)) == [
        ("Café, or tea?", 'Both "kinds"\nsecond line', "food"),
        ("Ünïcode?", "是", ""),
    ]


def test_write_csv_writes_header_and_reads_back(tmp_path):
    path = tmp_path / "out.csv"
    assert write_csv(ROWS, path) == 2
    assert path.read_bytes().startswith(b"question,answer,field\r\n")
    assert pairs(read_pairs(path)) == [
        ("Café, or tea?", 'Both "kinds"\nsecond line', "food"),
        ("Ünïcode?", "是", ""),
    ]


def test_write_jsonl_output_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "out.jsonl"
    write_jsonl(ROWS, path)
    loaded = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))
    assert loaded.column_names == ["question", "answer", "field"]
    assert loaded["answer"] == ['Both "kinds"\nsecond line', "是"]
