"""Number formatting shared by the generated tables and plot labels."""

from __future__ import annotations

import math

MISSING = "—"


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
