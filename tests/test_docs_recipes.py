"""The recipes of docs/architecture.md run as written: the method and the task they add appear
where the page says they do.

Each recipe is a file's content (the first code block) and a check to run from Python (the second).
They run here under a name of their own (the example's name with a suffix), so that a contributor who
saved the example under its own name, as the page suggests, neither breaks this test nor loses the
method when it cleans up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fisherlora as fl
from fisherlora.bench import tasks
from fisherlora.bench.presets import PRESETS
from fisherlora.init.catalog import remove_entry

PAGE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
SUFFIX = "_docs_recipe"


def recipe(title: str) -> tuple[str, str]:
    """The recipe's file and its check, as written on the page."""
    section = PAGE.read_text().split(f"## Recipe: {title}")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, f"'Recipe: {title}' should hold the file and the check, found {len(blocks)} blocks"
    return blocks[0], blocks[1]


def run(code: str, renames: dict[str, str]) -> None:
    for old, new in renames.items():
        code = code.replace(f'"{old}"', f'"{new}"')
    exec(compile(code, str(PAGE), "exec", dont_inherit=True), {"__name__": "recipe"})  # noqa: S102


def test_add_an_initialization_method(capsys: pytest.CaptureFixture[str]):
    name = "top_inputs" + SUFFIX
    renames = {"top_inputs": name, "top-inputs": "top-inputs-docs-recipe"}
    file, check = recipe("add an initialization method")
    assert "import fisherlora as fl" not in file, "a module of the package cannot import the package itself"
    try:
        run(file, renames)
        run(check, renames)
        entry = fl.get_method(name)
        assert entry.zero_start and entry.family == "fisher" and not entry.is_baseline
        assert any(spec.method == name for spec in PRESETS["quick"].specs())
        from fisherlora.cli import main

        assert main(["methods"]) == 0 and name in capsys.readouterr().out
    finally:
        if name in fl.list_methods():
            remove_entry(name)


def test_add_a_benchmark_task():
    name = "parity" + SUFFIX
    file, check = recipe("add a benchmark task")
    try:
        run(file, {"parity": name})
        run(check, {"parity": name})
        assert name in tasks.list_tasks()
        task = tasks.build_task(name)
        assert len(task.train_examples) == 20 and len(task.calibration_loader(2, 4, 0)) == 2
    finally:
        tasks.TASKS.pop(name, None)
