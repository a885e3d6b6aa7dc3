"""Where a result came from: git commit and dirty flag, package versions, machine."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "safetensors", "numpy", "fisherlora", "accelerate")


SOURCE_ROOT = Path(__file__).resolve().parents[3]


def _git(*arguments: str, root: Path = SOURCE_ROOT) -> str | None:
    try:
        completed = subprocess.run(["git", *arguments], cwd=root, capture_output=True, text=True, timeout=10,
                                   check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip()


@cache
def git_state() -> dict[str, Any]:
    """:func:`git_state_of` this package's source tree, computed once per process."""
    return git_state_of(SOURCE_ROOT)


def git_state_of(root: Path) -> dict[str, Any]:
    """`{"git_commit": sha or "unknown", "git_dirty": bool or None}` of the git tree at ``root``.

    Changes under ``results/`` do not count: benchmark workers append to tracked ``runs.jsonl``
    files there, and that must not mark the next run's code as uncommitted.
    """
    commit = _git("rev-parse", "HEAD", root=root)
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results", root=root)
    return {"git_commit": commit or "unknown", "git_dirty": None if status is None else bool(status)}


@cache
def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "missing"
    return found


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # The instruction set torch's CPU kernels dispatch to (AVX512, AVX2, ...): runs on different ones
        # round differently, and a run at a high learning rate can amplify that (README, "Reruns").
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
