"""The recipes of docs/architecture.md run as written: the method and the task they add appear
where the page says they do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fisherlora as fl
from fisherlora.bench import tasks
from fisherlora.bench.presets import PRESETS
from fisherlora.init.catalog import remove_entry

PAGE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def recipe(title: str) -> str:
    section = PAGE.read_text().split(f"## Recipe: {title}")[1]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]


def test_add_an_initialization_method(capsys: pytest.CaptureFixture[str]):
    namespace: dict = {"__name__": "recipe"}
    try:
        exec(compile(recipe("add an initialization method"), str(PAGE), "exec", dont_inherit=True), namespace)  # noqa: S102
        entry = fl.get_method("top_inputs")
        assert entry.zero_start and entry.family == "fisher" and not entry.is_baseline
        assert any(spec.method == "top_inputs" for spec in PRESETS["quick"].specs())
        from fisherlora.cli import main

        assert main(["methods"]) == 0 and "top_inputs" in capsys.readouterr().out
    finally:
        remove_entry("top_inputs")


def test_add_a_benchmark_task():
    namespace: dict = {"__name__": "recipe"}
    try:
        exec(compile(recipe("add a benchmark task"), str(PAGE), "exec", dont_inherit=True), namespace)  # noqa: S102
        assert "parity" in tasks.list_tasks()
        task = tasks.build_task("parity")
        assert len(task.train_examples) == 20 and len(task.calibration_loader(2, 4, 0)) == 2
    finally:
        tasks.TASKS.pop("parity", None)
