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
