"""Where an initialization spends its time: wall seconds per phase, recorded only when asked.

The library marks its phases with `phase(name)`; outside `record_phases()` that costs one context
variable lookup. Inside, each phase's wall time is summed, exclusively: a phase opened inside
another pauses the outer one, so the phases add up to at most the enclosing wall time.

Phases (`PHASES`):
    forward: the model's forward passes over the calibration batches.
    backward: the backward passes (output gradients; weight gradients where a method takes them).
    statistics: adding the recorded rows to the Kronecker-factor sums (and `M`).
    factorization: per-layer work after the data: roots/Cholesky factors, eigen- and singular
        vectors, the adapter factors, and Fisher rank allocation's layer energies.
    write: writing adapter factors and residual base weights into the model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

import torch

Phase = Literal["forward", "backward", "statistics", "factorization", "write"]
PHASES: tuple[Phase, ...] = ("forward", "backward", "statistics", "factorization", "write")


@dataclass
class _Recorder:
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    open: list[tuple[str, float]] = field(default_factory=list)  # (phase, start of its current stretch)


_ACTIVE: ContextVar[_Recorder | None] = ContextVar("fisherlora_phases", default=None)


def _now() -> float:
    # Asynchronous devices: wait for queued work, so that it is charged to the phase that queued it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@contextmanager
def phase(name: Phase) -> Iterator[None]:
    """Charge the enclosed block's wall time to `name` (when `record_phases` is active)."""
    recorder = _ACTIVE.get()
    if recorder is None:
        yield
        return
    start = _now()
    if recorder.open:  # pause the enclosing phase
        outer, outer_start = recorder.open[-1]
        recorder.totals[outer] += start - outer_start
    recorder.open.append((name, start))
    try:
        yield
    finally:
        end = _now()
        _, own_start = recorder.open.pop()
        recorder.totals[name] += end - own_start
        if recorder.open:  # resume the enclosing phase
            outer, _ = recorder.open[-1]
            recorder.open[-1] = (outer, end)


@contextmanager
def record_phases() -> Iterator[dict[str, float]]:
    """Record the phases of the enclosed block; the yielded dict (phase -> wall seconds) is filled
    in when the block ends."""
    recorder = _Recorder()
    token = _ACTIVE.set(recorder)
    result: dict[str, float] = {}
    try:
        yield result
    finally:
        _ACTIVE.reset(token)
        result.update(recorder.totals)
