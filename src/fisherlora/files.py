"""Writes that never leave a half-written file or folder behind: a temporary sibling, then a rename."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Let `write(temporary_path)` produce the file in the same folder as `path`, then rename it
    into place; the temporary file is removed if `write` fails."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`."""

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextmanager
def staged_directory(path: str | os.PathLike[str], keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path`, on error it is removed.

    An existing folder is moved aside first and deleted only after the new one is in place, so an
    interruption never leaves neither. With `keep_existing`, a `path` that exists when the staged
    folder is complete (another writer finished first) is kept and the staged folder discarded, so
    a reader of `path` never sees it replaced.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp creates 0700; give the folder ordinary permissions
        yield staging
        if keep_existing and target.exists():
            shutil.rmtree(staging, ignore_errors=True)
        elif target.exists():
            backup = target.with_name(f".{target.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(target, backup)
            os.replace(staging, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            try:
                os.replace(staging, target)
            except OSError:
                if not (keep_existing and target.exists()):  # not a lost race with another writer
                    raise
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def files_sha256(*paths: str | os.PathLike[str]) -> str:
    """The sha256 (hex) of the files' contents, in order: what a run id records of a user's data, so
    that an edited file gives new runs (its name would not).

    Raises:
        FileNotFoundError: a path that is not a file (named).
    """
    digest = hashlib.sha256()
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
