"""The committed tables are generated, not typed: regenerating them from the committed runs gives
the committed files byte for byte (plots excluded: their bytes depend on the matplotlib build)."""

from __future__ import annotations

import shutil
from pathlib import Path

from fisherlora.bench.overview import OVERVIEW_FILE, write_overview
from fisherlora.bench.report import SUMMARY_FILE, write_report
from fisherlora.bench.results import RUNS_FILE

RESULTS = Path(__file__).resolve().parents[2] / "results"
# In the README's report order; `text-long` once its runs are committed.
FOLDERS = tuple(name for name in ("text", "text-long", "lm", "vision") if (RESULTS / name / RUNS_FILE).is_file())


def test_committed_tables_regenerate_byte_identical(tmp_path: Path) -> None:
    copies = []
    for name in FOLDERS:
        copy = tmp_path / name
        copy.mkdir()
        shutil.copy(RESULTS / name / RUNS_FILE, copy / RUNS_FILE)
        write_report(copy)
        assert (copy / SUMMARY_FILE).read_bytes() == (RESULTS / name / SUMMARY_FILE).read_bytes(), name
        copies.append(copy)
    markdown, _, _ = write_overview(copies)
    assert markdown.read_bytes() == (RESULTS / OVERVIEW_FILE).read_bytes()
