"""Wall time and peak resident memory of one phase, measured by sampling /proc in a thread."""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; falls back to the lifetime peak)."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class PhaseCost:
    """Attributes: seconds (wall), cpu_seconds (CPU time of this process, every thread: on a shared
    machine it counts only the time this process ran), peak_rss_mb (peak RSS during the phase),
    start_rss_mb."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    start_rss_mb: float = 0.0

    @property
    def extra_rss_mb(self) -> float:
        return self.peak_rss_mb - self.start_rss_mb


@contextmanager
def measure(interval: float = 0.01) -> Iterator[PhaseCost]:
    """Measure the enclosed block: `with measure() as cost: ...; cost.seconds, cost.peak_rss_mb`."""
    cost = PhaseCost(start_rss_mb=current_rss_bytes() / 2**20)
    peak = [current_rss_bytes()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], current_rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    cpu_start = time.process_time()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - start
        cost.cpu_seconds = time.process_time() - cpu_start
        stop.set()
        sampler.join()
        cost.peak_rss_mb = max(peak[0], current_rss_bytes()) / 2**20
