"""Rows of user data in JSON, JSONL, CSV or Parquet: read with errors that name the file and line, write atomically.

Every prepare/curate script reads its input through `iter_records` / `read_records`, so a malformed file fails the
same way everywhere:

    data.jsonl line 7: not valid JSON (Expecting ',' delimiter, column 31)
    data.csv: not UTF-8 text (byte 0xff at offset 1042, line 12)

A row is a dict; `Record.where` says where it came from ("data.jsonl line 7", "data.csv row 3", "data.json item 5")
so later checks (a missing field, an empty answer) can name the row too.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from model.files import publish_file

FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class RecordError(ValueError):
    """Malformed input data; the message names the file and the line or row."""


@dataclass
class Record:
    row: dict
    where: str


def data_format(path: Path | str) -> str:
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise RecordError(f"{path}: unknown data format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    return fmt


def _utf8_error(path: Path, data: bytes, error: UnicodeDecodeError) -> RecordError:
    line = data.count(b"\n", 0, error.start) + 1
    return RecordError(f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}, line {line}); "
                       "re-encode it, e.g. `iconv -f latin1 -t utf-8`")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, data, e) from None


def _iter_jsonl(path: Path) -> Iterator[Record]:
    with open(path, "rb") as fp:
        offset = 0
        for line_number, raw in enumerate(fp, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(f"{path} line {line_number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                                  f"{offset + e.start}); re-encode it, e.g. `iconv -f latin1 -t utf-8`") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path} line {line_number}: not valid JSON ({e.msg}, column {e.colno})") from None
            yield Record(row, f"{path} line {line_number}")


def _iter_json(path: Path) -> Iterator[Record]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise RecordError(f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                          "one JSON object per line is .jsonl") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise RecordError(f"{path}: expected a JSON list of rows (or an object holding exactly one list), "
                              f"got an object with keys {sorted(data)[:10]}")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    for index, row in enumerate(data):
        yield Record(row, f"{path} item {index}")


def _iter_csv(path: Path) -> Iterator[Record]:
    text = _read_text(path)
    # not str.splitlines: it also breaks lines at U+0085, U+2028, \x0c... which are ordinary characters in a CSV field
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        for row in reader:
            if None in row:
                raise RecordError(f"{path} line {reader.line_num}: more values than the {len(reader.fieldnames)} "
                                  f"columns of the header")
            yield Record({key: ("" if value is None else value) for key, value in row.items()},
                         f"{path} line {reader.line_num}")
    except csv.Error as e:
        raise RecordError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None


def _iter_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a file that is not Parquet
        raise RecordError(f"{path}: not a readable Parquet file ({e})") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield Record(row, f"{path} row {index}")
            index += 1


def iter_records(path: Path | str) -> Iterator[Record]:
    """Stream the rows of a JSON/JSONL/CSV/Parquet file (JSONL, CSV-by-lines and Parquet in bounded memory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    reader = {"json": _iter_json, "jsonl": _iter_jsonl, "csv": _iter_csv, "parquet": _iter_parquet}[data_format(path)]
    for record in reader(path):
        if not isinstance(record.row, dict):
            raise RecordError(f"{record.where}: expected an object with fields, got {type(record.row).__name__}")
        yield record


def read_records(path: Path | str) -> list[Record]:
    """All rows of a file; an empty file is an error (there is nothing to prepare from it)."""
    records = list(iter_records(path))
    if not records:
        raise RecordError(f"{path}: no rows in the file")
    return records


def field(record: Record, name: str, *, required: bool = True, default: str = "") -> str:
    """A text field of a row: a missing or non-text value names the row and the fields it does have."""
    if name not in record.row or record.row[name] is None:
        if not required:
            return default
        raise RecordError(f"{record.where}: missing field {name!r} (it has {sorted(record.row)}); "
                          "map your column names with the --*_field flags")
    value = record.row[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RecordError(f"{record.where}: field {name!r} should be text, got {type(value).__name__}")
    return value


def write_records(rows: Iterable[dict], path: Path | str) -> int:
    """Write rows in the format the suffix names, to a temporary file renamed into place; returns the row count."""
    path = Path(path)
    fmt = data_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    count = 0
    try:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = list(rows)
            count = len(rows)
            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as fp:
                if fmt == "jsonl":
                    for row in rows:
                        fp.write(json.dumps(row, ensure_ascii=False) + "\n")
                        count += 1
                elif fmt == "json":
                    rows = list(rows)
                    count = len(rows)
                    json.dump(rows, fp, ensure_ascii=False, indent=1)
                    fp.write("\n")
                else:
                    writer = None
                    for row in rows:
                        if writer is None:
                            writer = csv.DictWriter(fp, fieldnames=list(row))
                            writer.writeheader()
                        writer.writerow(row)
                        count += 1
        publish_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
