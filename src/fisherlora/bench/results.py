"""The results file: one JSON line per run, appended atomically, read back for resume and reports."""

from __future__ import annotations

import errno
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


CLAIMS_FOLDER = "runs.jsonl.claims"


class RunClaims:
    """The runs that processes sharing a results folder are executing now, so that several processes
    started on the same preset split its runs instead of repeating them: one file per run in
    `OUT/runs.jsonl.claims/`, created exclusively (`O_EXCL`) and holding the claiming process's host
    and pid, removed when its record is written.

    A claim whose process is gone (same host, pid no longer running: a crash, a kill) is taken
    over, so an interrupted run is redone on resume. A claim from another host is always respected:
    after a crash there, delete `runs.jsonl.claims/`.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.folder = Path(directory) / CLAIMS_FOLDER
        self.owner = f"{socket.gethostname()} {os.getpid()}"

    def _path(self, run_id: str) -> Path:
        return self.folder / hashlib.sha1(run_id.encode()).hexdigest()

    def claim(self, run_id: str) -> bool:
        """Claim `run_id` for this process: False when a live process holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(run_id)
        for _ in range(2):
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if _holder_alive(path):
                    return False
                path.unlink(missing_ok=True)  # a dead process's claim
                continue
            with os.fdopen(descriptor, "w") as file:
                file.write(f"{self.owner}\n{run_id}\n")
            return True
        return False

    def held_elsewhere(self, run_ids: set[str]) -> int:
        """How many of `run_ids` a live process other than this one holds now."""
        count = 0
        for run_id in run_ids:
            path = self._path(run_id)
            try:
                owner = path.read_text().split("\n", 1)[0]
            except FileNotFoundError:
                continue
            count += owner != self.owner and _holder_alive(path)
        return count

    def release(self, run_id: str) -> None:
        """Remove this process's claim of `run_id` (a claim of another process is left alone)."""
        path = self._path(run_id)
        try:
            if path.read_text().split("\n", 1)[0] == self.owner:
                path.unlink()
        except FileNotFoundError:
            pass


def _holder_alive(path: Path) -> bool:
    """Whether the process named in the claim file `path` still runs (True for another host's)."""
    try:
        host, pid = path.read_text().split("\n", 1)[0].rsplit(" ", 1)
    except (FileNotFoundError, ValueError):
        return False  # gone meanwhile, or cut off while being written
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError as error:  # EPERM: alive, another user's
        return error.errno == errno.EPERM
    return True
