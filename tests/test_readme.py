"""The README's Python example runs as written, and its methods table matches the registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fisherlora as fl

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.integration
def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from peft import PeftModel

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_blocks()[0], str(README), "exec"), namespace)  # noqa: S102
    assert (tmp_path / "stats.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert isinstance(namespace["report"][0], fl.LayerReport)
    assert isinstance(namespace["model"], PeftModel)


def test_readme_methods_table_is_generated_from_the_catalogue():
    from fisherlora.methods import methods_table

    section = README.read_text().split("<!-- results:methods:start -->\n")[1].split("<!-- results:methods:end -->")[0]
    assert section == methods_table() + "\n", "regenerate it: fisherlora methods --readme README.md"


def test_docs_stand_alone():
    """The repository's docs and code cite only files in the repository: no notes outside it."""
    root = README.parent
    files = [README, *root.glob("docs/*.md"), *root.glob("src/**/*.py"), *root.glob("tests/**/*.py"), root / "Makefile"]
    outside = re.compile(r"DESIGN\.md|\bDATA\.md|\.\./shared")
    offenders = [str(path.relative_to(root)) for path in files
                 if path != Path(__file__).resolve() and outside.search(path.read_text())]
    assert not offenders, f"these cite notes outside the repository: {offenders}"
    for link in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)\)", README.read_text()):
        assert (root / link).is_file(), f"README links to a missing {link}"


def _pooled_rows() -> dict[str, tuple[float, float, float]]:
    """`{method: (standardized Δ, low, high)}` of the pooled table in the committed results/verdict.md."""
    verdict = (README.parent / "results" / "verdict.md").read_text()
    pooled = verdict.split("## Pooled across tasks")[1]
    rows = {}
    for line in pooled.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        found = re.match(r"([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]", cells[2]) if len(cells) > 2 else None
        if found:
            rows[cells[0]] = (float(found[1]), float(found[2]), float(found[3]))
    return rows


def test_the_readings_pooled_numbers_are_the_generated_verdicts():
    """The README's reading of the verdict is prose, but its numbers are the generated table's: a rerun of
    the report that moves them makes this fail until the reading says what the table says."""
    text = README.read_text()
    bullet = text[text.index("- Pooled:", text.index("**Reading of the verdict")):]
    bullet = bullet[: bullet.index("\n- ")]
    rows = _pooled_rows()
    quoted = re.findall(r"([\d.]+) \(`([^`]+)`\)", bullet)
    intervals = re.findall(r"`([^`]+)` by ([\d.]+) \[([\d.]+), ([\d.]+)\]", bullet)
    assert quoted or intervals, bullet
    for value, method in quoted:  # "worse by X": the bullet gives the magnitude of a negative Δ
        assert float(value) == pytest.approx(abs(rows[method][0]), abs=0.0051), (method, value)
    for method, value, low, high in intervals:
        effect, table_low, table_high = rows[method]
        assert (float(value), float(low), float(high)) == pytest.approx(
            (abs(effect), abs(table_high), abs(table_low)), abs=0.0051), method
