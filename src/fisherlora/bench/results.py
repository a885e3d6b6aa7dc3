"""The results file: one JSON line per run, appended atomically, read back for resume and reports."""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.records import read_jsonl
from ..files import atomic_write_text

RUNS_FILE = "runs.jsonl"


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, in file order (the library's reader, `fisherlora.data.records`).

    Raises ``FileNotFoundError`` if the file is missing and ``ValueError`` naming the file and the
    1-based line number for a line that is not a JSON object.
    """
    return [record.fields for record in read_jsonl(path)]


def load_runs(results_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Run records from ``results_dir/runs.jsonl`` (:func:`read_records`: missing file and bad lines raise)."""
    return read_records(Path(results_dir) / RUNS_FILE)


def common_folder(folders: Sequence[str | os.PathLike[str]]) -> Path:
    """The deepest folder containing every one of ``folders`` (the folder itself when there is one)."""
    return Path(os.path.commonpath([os.path.abspath(folder) for folder in folders]))


def clean_for_json(value: Any) -> Any:
    # JSON has no NaN/inf: failed metrics are written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): clean_for_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_for_json(item) for item in value]
    return value


class ResultsFile:
    """`OUT/runs.jsonl`. Each append rewrites the file through a temporary file and a rename, so
    an interruption leaves either the old or the new file, never half a line."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / RUNS_FILE

    def records(self) -> list[dict[str, Any]]:
        """Every record written so far (none when the file does not exist yet)."""
        return read_records(self.path) if self.path.exists() else []

    def done_ids(self) -> set[str]:
        return {record["run_id"] for record in self.records() if "run_id" in record}

    def append(self, record: dict[str, Any]) -> None:
        """Add one record. An exclusive lock on `runs.jsonl.lock` lets several benchmark
        processes (e.g. one per seed) share the file without losing a line."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "runs.jsonl.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._append_locked(record)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _append_locked(self, record: dict[str, Any]) -> None:
        existing = self.path.read_text() if self.path.exists() else ""
        if existing and not existing.endswith("\n"):
            existing += "\n"
        line = json.dumps(clean_for_json(record), sort_keys=True)
        atomic_write_text(self.path, existing + line + "\n")
