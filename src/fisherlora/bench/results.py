"""The results file: one JSON line per run, appended atomically, read back for resume."""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path
from typing import Any

from ..files import atomic_write_text


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
        self.path = self.directory / "runs.jsonl"

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{self.path}, line {number}: not valid JSON ({error})") from error
        return records

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
