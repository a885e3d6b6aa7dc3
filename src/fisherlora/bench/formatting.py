"""Number formatting shared by the generated tables and plot labels."""

from __future__ import annotations

import math

MISSING = "—"


def counted(count: int, noun: str) -> str:
    """`1 run`, `2 runs`: the count with its noun, plural but for one (`noun` is the singular)."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def fmt_lr(lr: float | None) -> str:
    """Compact scientific notation: 0.0003 -> '3e-4', 0.00015 -> '1.5e-4'; None / NaN -> a dash."""
    if lr is None or not math.isfinite(lr):
        return MISSING
    mantissa, exponent = f"{lr:.3e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or a dash for None / NaN."""
    if value is None or not math.isfinite(value):
        return MISSING
    return format(value, spec)


def fmt_p(p: float) -> str:
    """p-values with three significant digits; NaN (undefined test) as a dash."""
    return fmt(p, ".3g")


def progress_note(done: int, total: int, running_elsewhere: int, seconds_per_run: float) -> str:
    """The progress a benchmark process prints after each run, for a log file where no progress bar
    shows: runs done in the results folder out of `total`, runs other processes sharing the folder
    hold now, and the time left if every process keeps this one's pace (`seconds_per_run`, wall
    seconds per run of this process), e.g. `[37/210 in the folder, 1 running elsewhere; about 2.7 h
    left at 3.6 min per run, 2 processes]`."""
    processes = 1 + running_elsewhere
    left_hours = max(total - done, 0) * seconds_per_run / processes / 3600
    elsewhere = f", {running_elsewhere} running elsewhere" if running_elsewhere else ""
    pace = f"{seconds_per_run / 60:.1f} min per run" + (f", {processes} processes" if processes > 1 else "")
    left = f"{left_hours:.1f} h" if left_hours >= 1 else f"{left_hours * 60:.0f} min"  # "0.0 h" said nothing
    return f"[{done}/{total} in the folder{elsewhere}; about {left} left at {pace}]"
