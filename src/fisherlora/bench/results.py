"""The results file: one JSON line per run, appended atomically, read back for resume and reports."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import socket
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
    try:
        return [record.fields for record in read_jsonl(path)]
    except ValueError as error:
        # bench rewrites the file through a rename, so it never leaves half a line: a broken line was
        # written by something else (an editor, a cut copy), and only the person who did can repair it.
        raise ValueError(f"{error}; `fisherlora bench` writes this file whole (a temporary file and a rename), "
                         "so the line was changed by something else: repair or delete it") from None


def load_runs(results_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Run records from ``results_dir/runs.jsonl`` (:func:`read_records`: bad lines raise).

    Raises:
        FileNotFoundError: no ``runs.jsonl`` in ``results_dir`` (the message says how to make one).
    """
    path = Path(results_dir) / RUNS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RUNS_FILE} in {results_dir}: `fisherlora bench --out {results_dir}` writes one")
    return read_records(path)


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


CLAIMS_FOLDER = "runs.jsonl.claims"


class RunClaims:
    """The runs that processes sharing a results folder are executing now, so that several processes
    started on the same preset split its runs instead of repeating them: one file per run in
    `OUT/runs.jsonl.claims/`, on which the running process holds an exclusive `flock` for as long as
    it runs the run (the file names its host and pid, for people); it is removed when the run's
    record is written. The operating system drops the lock when the process ends in any way (a
    crash, `kill -9`), so a run whose process died is free to claim again.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.folder = Path(directory) / CLAIMS_FOLDER
        self.owner = f"{socket.gethostname()} {os.getpid()}"
        self.held: dict[str, int] = {}  # run id -> the descriptor holding its lock

    def _path(self, run_id: str) -> Path:
        return self.folder / hashlib.sha1(run_id.encode()).hexdigest()

    def claim(self, run_id: str) -> bool:
        """Claim `run_id` for this process: False when another process holds it."""
        if run_id in self.held:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(run_id)
        while True:
            descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                return False
            try:
                same = os.fstat(descriptor).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(descriptor)  # locked a file its holder removed meanwhile: claim the current one
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{self.owner}\n{run_id}\n".encode())
        self.held[run_id] = descriptor
        return True

    def held_elsewhere(self, run_ids: set[str]) -> int:
        """How many of `run_ids` another process holds now."""
        return len(self.held_elsewhere_ids(run_ids))

    def held_elsewhere_ids(self, run_ids: set[str]) -> set[str]:
        """Those of `run_ids` another process holds now."""
        held: set[str] = set()
        for run_id in run_ids - set(self.held):
            try:
                descriptor = os.open(self._path(run_id), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held.add(run_id)
            finally:
                os.close(descriptor)
        return held

    def release(self, run_id: str) -> None:
        """Remove this process's claim of `run_id` (nothing when it holds none)."""
        descriptor = self.held.pop(run_id, None)
        if descriptor is None:
            return
        self._path(run_id).unlink(missing_ok=True)  # while still locked: nobody takes a stale file
        os.close(descriptor)  # drops the lock
