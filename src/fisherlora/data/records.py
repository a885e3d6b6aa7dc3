"""Read a user's data file, CSV or JSON Lines, into records that remember their line number.

Formats are chosen by the file name: ``.csv`` (a header row, then one record per row) or
``.jsonl``/``.json`` (one JSON object per line); either may be compressed as ``.bz2`` or ``.gz``.
The standard library readers are used on purpose: they report the line a record starts on, which
every error message names, and they stream files of any size. Nothing here imports torch.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".json")
COMPRESSED_SUFFIXES = (".bz2", ".gz")


@dataclass(frozen=True)
class Record:
    """One example of a data file.

    Attributes:
        line: 1-based line of the file where the record starts (the header is line 1 of a CSV).
        fields: field name -> value; CSV values are strings, JSON values keep their JSON type. A
            CSV row shorter than the header lacks the missing fields.
    """

    line: int
    fields: dict[str, Any]


@contextmanager
def _large_csv_fields() -> Iterator[None]:
    """Temporarily lift csv's 128 KiB field limit (long plot summaries exist) and restore it."""
    old = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def open_text(path: Path) -> io.TextIOBase:
    """Open ``path`` as UTF-8 text for the csv/json readers; ``.bz2`` / ``.gz`` are decompressed on the fly."""
    if path.name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8", newline="")  # type: ignore[return-value]
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")  # type: ignore[return-value]
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115 - returned to the caller


def _uncompressed_name(path: str | Path) -> str:
    """The file name in lower case without its compression suffix (`.bz2`, `.gz`)."""
    name = Path(path).name.lower()
    for suffix in COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def file_format(path: str | Path) -> str:
    """"csv" or "jsonl", from the file name (compression suffix ignored); `ValueError` otherwise."""
    name = _uncompressed_name(path)
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise ValueError(
        f"data file {str(path)!r}: unknown format; name it *.csv (with a header row) or *.jsonl "
        f"(one JSON object per line), optionally compressed as {' or '.join(COMPRESSED_SUFFIXES)}"
    )


def _csv_records(path: Path) -> list[Record]:
    records = []
    with _large_csv_fields(), open_text(path) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return []
        start = reader.line_num + 1
        for row in reader:
            if row:  # csv yields [] for a blank line: not a record
                records.append(Record(start, dict(zip(header, row, strict=False))))
            start = reader.line_num + 1  # a quoted field may span lines: the next record starts after this one
    return records


def read_jsonl(path: str | os.PathLike[str]) -> list[Record]:
    """The JSON objects of a JSON Lines file (optionally .bz2/.gz), in file order; blank lines are skipped.

    Raises:
        FileNotFoundError: no such file. ValueError: a line that is not a JSON object, naming the
            file and the 1-based line.
    """
    path = Path(path)
    records = []
    with open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                hint = " (a JSON array? write one JSON object per line)" if line.lstrip().startswith("[") else ""
                raise ValueError(f"{path}: line {line_number}: not valid JSON ({error.msg}){hint}") from None
            if not isinstance(value, dict):
                raise ValueError(f"{path}: line {line_number}: expected a JSON object, got {type(value).__name__}")
            records.append(Record(line_number, value))
    return records


def read_records(path: str | Path) -> list[Record]:
    """Every record of a CSV or JSONL file, in file order, with the line it starts on.

    Raises:
        ValueError: the file is missing, has an unknown suffix, or a JSONL line is not a JSON object
            (naming the line).
    """
    path = Path(path)
    kind = file_format(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    return _csv_records(path) if kind == "csv" else read_jsonl(path)


def read_csv_columns(path: str | Path, columns: Sequence[str]) -> list[list[str]]:
    """Read the named columns of a CSV with a header row.

    Returns one list of strings per requested column, all of the same length (one entry
    per data row; a row shorter than the header gives ""). Raises ``ValueError`` naming the
    file (and the column, listing the columns present) when the file is missing or a column is absent.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"CSV file {str(path)!r} does not exist (wanted columns {list(columns)})")
    with _large_csv_fields(), open_text(path) as handle:
        reader = csv.DictReader(handle)
        present = list(reader.fieldnames or [])
        for column in columns:
            if column not in present:
                raise ValueError(
                    f"CSV file {str(path)!r} has no column {column!r}; columns present: {present}"
                )
        out: list[list[str]] = [[] for _ in columns]
        for row in reader:
            for values, column in zip(out, columns, strict=True):
                values.append(row[column] if row[column] is not None else "")
    return out


def read_labeled_csv(path: str | Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """Read ``(texts, labels)`` from a CSV (plain, ``.bz2`` or ``.gz``) with a header row.

    Returns two lists of equal length, one entry per data row; labels stay strings (the
    caller maps them to ids). Missing file or column -> ``ValueError`` naming both.
    """
    texts, labels = read_csv_columns(path, [text_column, label_column])
    return texts, labels


def read_labeled_examples(path: str | Path, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` from a CSV with a header row (``read_labeled_csv``) or, for a ``.jsonl``/``.json``
    name, a JSON Lines file whose objects hold both fields (labels as strings: ``1`` and ``"1"`` are
    one class).

    Raises:
        ValueError: a missing file, column or field (naming the line and the fields present), or a
            text that is not a string.
    """
    if _uncompressed_name(path).endswith(JSONL_SUFFIXES):
        texts, labels = [], []
        for record in read_records(path):
            for name in (text_field, label_field):
                if name not in record.fields:
                    raise ValueError(f"{path}: line {record.line}: no field {name!r}; fields present: "
                                     f"{list(record.fields)}")
            text = record.fields[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}: line {record.line}: field {text_field!r} must be a string, "
                                 f"got {type(text).__name__}")
            texts.append(text)
            labels.append(str(record.fields[label_field]))
        return texts, labels
    return read_labeled_csv(path, text_field, label_field)
