"""One-off migration: mark every run record written before stages existed as stage "tune".

    python scripts/mark_tune_stage.py results/text results/lm results/vision

Each ``DIR/runs.jsonl`` is rewritten atomically; a record without ``"stage"`` gets
``"stage": "tune"``, every other byte of every line stays as it was (records are written with
sorted keys, so re-serializing a record reproduces its line). Run ids are not touched. Running it
twice changes nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fisherlora.bench.results import RUNS_FILE, read_records
from fisherlora.files import atomic_write_text


def mark(folder: Path) -> int:
    """Add ``"stage": "tune"`` where it is missing in ``folder/runs.jsonl``; return how many records changed."""
    path = folder / RUNS_FILE
    records = read_records(path)
    unchanged = [json.dumps(record, sort_keys=True) for record in records]
    if "\n".join(unchanged) + "\n" != "\n".join(line for line in path.read_text().splitlines() if line.strip()) + "\n":
        raise ValueError(f"{path}: lines are not sorted-key JSON as the benchmark writes them; not rewriting")
    changed = sum("stage" not in record for record in records)
    lines = [json.dumps({"stage": "tune", **record}, sort_keys=True) for record in records]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return changed


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"{name}: {mark(Path(name))} records marked stage 'tune'")
