"""Which benchmark methods are baselines and which are ours, and the order tables list them in.

The one place the report asks "baseline or ours", answered by the method catalogue: every method
outside the Fisher family (PEFT's, papers', weight-only) is a baseline, and the report compares
every other method against the best baseline of its task.
"""

from __future__ import annotations

from collections.abc import Iterable


def baselines() -> list[str]:
    """The baseline methods in the order tables list them (catalogue order)."""
    from ..init.catalog import ordered_entries
    from ..methods import CATALOG  # noqa: F401  (every method registered)

    return [entry.name for entry in ordered_entries() if entry.is_baseline]


def base_method(method: str) -> str:
    """The registered name without suffixes: ``"pissa+linear"`` -> ``"pissa"``,
    ``"fisher_svd@true"`` -> ``"fisher_svd"``."""
    return method.partition("@")[0].partition("+")[0]


def is_baseline(method: str) -> bool:
    """True for a baseline (its catalogue entry says so; with any suffix such as ``pissa+linear``);
    False for every Fisher variant of ours."""
    return base_method(method) in baselines()


def is_compared(method: str) -> bool:
    """True for the methods the report compares with the task's best baseline: every method of ours
    and every baseline re-implemented from a paper (catalogue family "paper"); PEFT's and weight-only
    baselines are the reference pool only."""
    if not is_baseline(method):
        return True
    from ..init.catalog import get_method

    return get_method(base_method(method)).family == "paper"


def method_order(methods: Iterable[str]) -> list[str]:
    """Stable display order: baselines in catalogue order (a suffixed variant right after its plain
    name), then ours sorted by name."""
    unique = set(methods)
    order = baselines()
    chosen = sorted((m for m in unique if is_baseline(m)), key=lambda m: (order.index(base_method(m)), m))
    ours = sorted(m for m in unique if not is_baseline(m))
    return chosen + ours
