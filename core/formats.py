"""Reading and writing QA-pair files: CSV, a JSON array of objects, and JSONL.

This is the one place where a pair file on disk becomes `PairRow`s and back. Every problem a
user can cause raises `BadInput` with a one-line message naming the file and, where there is
one, the 1-based physical line. It never touches the database: callers decide where rows go.

CSV cells are written spreadsheet-safe (OWASP's advice on CSV injection): a cell that a spreadsheet
would run as a formula (it starts with =, +, -, @, a tab or a carriage return) gets a leading `'`,
which spreadsheets read as "this is text" and do not show. Reading a CSV undoes exactly that: a cell
that is `'` followed by such a cell loses its first `'`, so an exported CSV imports back unchanged.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, TextIO

from core import files
from core.errors import BadInput

SUPPORTED_EXTENSIONS = (".csv", ".json", ".jsonl", ".ndjson")
_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_COLUMNS = ("question", "answer", "field")
_JSON_TYPES = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}

Record = tuple[str, dict[str, Any]]  # (where it is, for messages; its keys normalised by `_key`)

# A cell starting like this is a formula to a spreadsheet; so is one after any number of `'`, once the
# exporter's own quote is taken off again on import (so a text that starts with `'=` survives too).
_FORMULA_START = re.compile(r"'*[=+\-@\t\r]")


@dataclass(frozen=True)
class PairRow:
    question: str
    answer: str
    field: str = ""  # research field, "" when absent
    metadata: dict[str, Any] = dataclass_field(default_factory=dict)  # other columns or keys, as-is


@dataclass(frozen=True)
class ParsedFile:
    path: Path
    format: str  # "csv" | "json" | "jsonl"
    rows: list[PairRow]
    skipped_blank: int  # rows skipped because the question or answer was blank


def read_pairs(path: str | Path) -> ParsedFile:
    """Read a pair file, choosing the format by extension; blank pairs are skipped and counted."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise BadInput(f"{name}: file does not exist")
    if not path.is_file():
        raise BadInput(f"{name}: not a regular file")
    _format_of(name)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInput(f"{name}: cannot be read ({e.strerror})") from None
    return parse_pairs(data, name)


def parse_pairs(data: bytes, name: str) -> ParsedFile:
    """Parse a pair file's bytes (an upload, say); `name` gives the format and names the file in errors."""
    fmt = _format_of(name)
    text = _decode(data, name)
    records = {"csv": _csv_records, "json": _json_records, "jsonl": _jsonl_records}[fmt](text, name)
    rows = [row for row in (_to_row(record, where) for where, record in records) if row is not None]
    skipped = len(records) - len(rows)
    if not rows:
        raise BadInput(f"{name}: no usable rows ({skipped} skipped for blank question or answer)")
    return ParsedFile(path=Path(name), format=fmt, rows=rows, skipped_blank=skipped)


def _format_of(name: str) -> str:
    suffix = Path(name).suffix
    fmt = _FORMATS.get(suffix.lower())
    if fmt is None:
        expected = ", ".join(SUPPORTED_EXTENSIONS)
        raise BadInput(f"{name}: unsupported file extension {suffix!r}; use one of {expected}")
    return fmt


def write_jsonl(rows: Iterable[PairRow | Mapping[str, Any]], path: str | Path) -> int:
    """Write one {"question", "answer", "field"} object per line (UTF-8); return the count."""
    with files.replacing(path) as part, part.open("w", encoding="utf-8", newline="") as f:
        return dump_pairs(rows, "jsonl", f)


def write_csv(rows: Iterable[PairRow | Mapping[str, Any]], path: str | Path) -> int:
    """Write a CSV with the header question,answer,field (cells spreadsheet-safe); return the number of rows."""
    with files.replacing(path) as part, part.open("w", encoding="utf-8", newline="") as f:
        return dump_pairs(rows, "csv", f)


def dump_pairs(rows: Iterable[PairRow | Mapping[str, Any]], fmt: str, out: TextIO) -> int:
    """Write pairs as JSONL or CSV to a text stream opened with newline=""; return the count."""
    count = 0
    if fmt == "jsonl":
        for pair in _pairs(rows):
            out.write(json.dumps(dict(zip(_COLUMNS, pair, strict=True)), ensure_ascii=False) + "\n")
            count += 1
        return count
    writer = csv.writer(out)
    writer.writerow(_COLUMNS)
    for pair in _pairs(rows):
        writer.writerow([spreadsheet_safe(cell) for cell in pair])
        count += 1
    return count


def spreadsheet_safe(cell: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text, never runs as a formula (other values pass as they are)."""
    return f"'{cell}" if isinstance(cell, str) and _FORMULA_START.match(cell) else cell


def _from_spreadsheet_safe(cell: str) -> str:
    """The text `spreadsheet_safe` was given: its `'` before a formula start comes off."""
    return cell[1:] if cell.startswith("'") and _FORMULA_START.match(cell, 1) else cell


def _pairs(rows: Iterable[PairRow | Mapping[str, Any]]) -> Iterator[tuple[str, str, str]]:
    for row in rows:
        if isinstance(row, PairRow):
            yield row.question, row.answer, row.field
        else:
            yield row["question"], row["answer"], row.get("field") or ""


def _decode(data: bytes, name: str) -> str:
    try:
        text: str | None = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:  # NUL is valid UTF-8, but only binary files contain it
        raise BadInput(f"{name}: not a UTF-8 text file")
    if not text.strip():
        raise BadInput(f"{name}: file is empty")
    return text


def _key(raw: str) -> str:
    """`question`, `answer` and `field` match in any case; every name loses surrounding whitespace."""
    stripped = raw.strip()
    return stripped.lower() if stripped.lower() in _COLUMNS else stripped


def _check_unique(keys: list[str], where: str) -> None:
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise BadInput(f"{where}: {', '.join(map(repr, repeated))} given more than once")


def _to_row(record: dict[str, Any], where: str) -> PairRow | None:
    """The pair in `record`, or None when its question or answer is blank."""
    question, answer = record.get("question", ""), record.get("answer", "")
    field = record.get("field")
    values = {"question": question, "answer": answer, "field": "" if field is None else field}
    for key, value in values.items():
        if not isinstance(value, str):
            raise BadInput(f"{where}: {key!r} must be a string, got {_JSON_TYPES[type(value)]}")
    if not question.strip() or not answer.strip():
        return None
    metadata = {key: value for key, value in record.items() if key not in _COLUMNS}
    return PairRow(question.strip(), answer.strip(), values["field"].strip(), metadata)


def _csv_records(text: str, name: str) -> list[Record]:
    # strict=True: without it an unterminated quote silently swallows the rest of the file.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    lines: list[tuple[int, list[str]]] = []
    start = 1  # physical line where the record being read begins
    try:
        for fields in reader:
            if fields:  # a blank line reads as []
                lines.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        problem = "unterminated quoted field" if str(e) == "unexpected end of data" else str(e)
        raise BadInput(f"{name}, line {start}: broken CSV quoting: {problem}") from None

    (header_line, header), data = lines[0], lines[1:]
    columns = [_key(h) for h in header]
    _check_unique(columns, f"{name}, line {header_line}")
    missing = [c for c in ("question", "answer") if c not in columns]
    if missing:
        found = ", ".join(repr(h.strip()) for h in header)
        raise BadInput(f"{name}: no {' or '.join(map(repr, missing))} column (found columns: {found})")
    if not data:
        raise BadInput(f"{name}: CSV has a header but no rows")
    records = []
    for line, fields in data:
        if len(fields) > len(columns):
            raise BadInput(f"{name}, line {line}: more fields than the header ({len(fields)} > {len(columns)})")
        # a short row simply lacks its last cells; a missing question or answer then counts as blank
        cells = [_from_spreadsheet_safe(cell) for cell in fields]
        records.append((f"{name}, line {line}", dict(zip(columns, cells, strict=False))))
    return records


def _json_records(text: str, name: str) -> list[Record]:
    data = _parse_json(text, name)
    if not isinstance(data, list):
        raise BadInput(f"{name}: expected a JSON array of objects, got {_JSON_TYPES[type(data)]}")
    return [_object_record(item, f"{name}, index {index}") for index, item in enumerate(data)]


def _jsonl_records(text: str, name: str) -> list[Record]:
    # split on "\n" only: str.splitlines would also break on U+2028 etc., legal inside JSON strings.
    return [
        _object_record(_parse_json(line, name, number), f"{name}, line {number}")
        for number, line in enumerate(text.split("\n"), 1)
        if line.strip()
    ]


def _parse_json(text: str, name: str, line: int | None = None) -> Any:
    """The JSON value of a whole file, or of its JSONL line number `line`."""
    where = name if line is None else f"{name}, line {line}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{name}, line {(line or 1) + e.lineno - 1}, column {e.colno}: invalid JSON: {e.msg}") from None
    except RecursionError:  # json nests one Python call per array or object level
        raise BadInput(f"{where}: invalid JSON: nested too deeply to read") from None
    except ValueError:  # the only other ValueError of json.loads: Python's limit on int-string conversion
        raise BadInput(
            f"{where}: invalid JSON: a number with more than {sys.get_int_max_str_digits()} digits"
        ) from None


def _object_record(item: Any, where: str) -> Record:
    if not isinstance(item, dict):
        raise BadInput(f"{where}: expected a JSON object, got {_JSON_TYPES[type(item)]}")
    keys = [_key(k) for k in item]
    _check_unique(keys, where)
    return where, dict(zip(keys, item.values(), strict=True))
