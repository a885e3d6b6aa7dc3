"""The error raised when the data cannot give statistics."""

from __future__ import annotations


class StatisticsError(ValueError):
    """Statistics could not be collected from the data (empty, all masked, non-finite)."""
