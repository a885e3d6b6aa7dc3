"""Every initialization method the project knows, from the one catalogue (`init/catalog.py`)."""

from __future__ import annotations

from . import init as _init  # noqa: F401  (registers this project's initializers)
from . import peft_baselines as _peft_baselines  # noqa: F401  (registers PEFT's)
from .init.catalog import CATALOG, MethodEntry, ordered_entries


def list_methods() -> dict[str, str]:
    """Name -> one-line description of every method, baselines first (live: includes methods
    registered after import)."""
    return {entry.name: entry.description for entry in ordered_entries()}


def methods_table() -> str:
    """The README's methods table (markdown), one row per catalogue entry."""

    def mark(value: bool) -> str:
        return "yes" if value else "no"

    rows = ["| method | family | starts at zero | keeps the function at step 0 | statistics | what it does |",
            "|---|---|---|---|---|---|"]
    for entry in ordered_entries():
        statistics = ", ".join(_STATISTIC_SYMBOLS[name] for name in entry.statistics) or (
            "data (PEFT's own)" if entry.uses_data else "none")
        if entry.statistics_for is not None:
            statistics += " (per its options)"
        rows.append(f"| `{entry.name}` | {entry.family} | {mark(entry.zero_start)} | "
                    f"{mark(entry.preserves_function)} | {statistics} | {entry.description} |")
    return "\n".join(rows)


_STATISTIC_SYMBOLS = {"act_cov": "A", "grad_cov": "G", "grad_mean": "M"}

PEFT_BASELINES: dict[str, str] = {entry.name: entry.description for entry in ordered_entries()
                                  if entry.family == "peft"}
METHODS: tuple[str, ...] = tuple(list_methods())
"""The methods registered at import time; `list_methods()` is the live list."""

__all__ = ["CATALOG", "METHODS", "PEFT_BASELINES", "MethodEntry", "list_methods", "methods_table"]
