"""Which benchmark methods are baselines and which are ours, and the order tables list them in.

The one place that decides "baseline or ours": the report compares every method that is not a
baseline against the best baseline of its task.
"""

from __future__ import annotations

from collections.abc import Iterable

BASELINES: tuple[str, ...] = ("lora", "gaussian", "pissa", "olora", "eva", "corda", "lora_ga", "milora")
"""Baseline methods, in the order tables list them. Every other method name is a Fisher variant (ours)."""


def base_method(method: str) -> str:
    """The registered name without suffixes: ``"pissa+linear"`` -> ``"pissa"``,
    ``"fisher_svd@true"`` -> ``"fisher_svd"``."""
    return method.partition("@")[0].partition("+")[0]


def is_baseline(method: str) -> bool:
    """True for the baseline initializations (:data:`BASELINES`, with any view suffix such as
    ``pissa+linear``); False for every Fisher variant of ours."""
    return base_method(method) in BASELINES


def method_order(methods: Iterable[str]) -> list[str]:
    """Stable display order: baselines in :data:`BASELINES` order (a suffixed variant right after
    its plain name), then ours sorted by name."""
    unique = set(methods)
    baselines = sorted((m for m in unique if is_baseline(m)), key=lambda m: (BASELINES.index(base_method(m)), m))
    ours = sorted(m for m in unique if not is_baseline(m))
    return baselines + ours
