"""Where the packaged model files are, and the cache of model copies made from them.

A cached copy is written into a staged folder that is renamed into place only when complete
(:func:`fisherlora.files.staged_directory`), so a crashed or concurrent writer never leaves a
half-written copy under the final name, and a folder that exists is complete.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from fisherlora.files import staged_directory


def cache_dir() -> Path:
    """Cache root: ``$FISHERLORA_CACHE`` if set, else ``~/.cache/fisherlora``."""
    root = os.environ.get("FISHERLORA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fisherlora"


def package_dir(package: str, install_hint: str) -> Path:
    """Folder of an installed package, located without importing it (some import heavy deps).

    Raises ``ValueError`` with ``install_hint`` when the package is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"package {package!r} is not installed; {install_hint}")
    return Path(spec.origin).parent


def cached_folder(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_dir() / name``, made once by ``build(empty_folder)`` when it does not exist yet.

    ``build`` writes into a staged sibling folder that becomes ``name`` only when ``build``
    returns; if it raises, nothing is left behind. When two processes build at once, the first
    finished copy stays and the other is discarded (a reader never sees a copy replaced).
    """
    target = cache_dir() / name
    if target.is_dir():
        return target
    with staged_directory(target, keep_existing=True) as staging:
        build(staging)
    return target
