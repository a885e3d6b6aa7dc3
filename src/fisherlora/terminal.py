"""Progress output that suits where it goes: bars on a terminal; in a log file (`> log 2>&1`),
where every bar redraw would be one more line, no bars and one plain line per finished step."""

from __future__ import annotations

import sys


def progress_bars_wanted(show_progress: bool) -> bool:
    """Whether to draw progress bars: asked for, and stderr (where tqdm draws) is a terminal."""
    return show_progress and sys.stderr.isatty()


def log_line(text: str) -> None:
    """One finished step, for a reader of a log file: a line on stderr, flushed at once."""
    print(text, file=sys.stderr, flush=True)
