import subprocess
from pathlib import Path

from fisherlora.bench.provenance import git_state_of


def _git(root: Path, *arguments: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *arguments], cwd=root, check=True,
                   capture_output=True)


def test_results_files_do_not_make_the_tree_dirty_but_source_edits_do(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "runs.jsonl").write_text("{}\n")
    (tmp_path / "module.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    assert git_state_of(tmp_path)["git_dirty"] is False

    with open(tmp_path / "results" / "runs.jsonl", "a") as lines:
        lines.write("{}\n")
    assert git_state_of(tmp_path)["git_dirty"] is False

    (tmp_path / "module.py").write_text("x = 2\n")
    state = git_state_of(tmp_path)
    assert state["git_dirty"] is True
    assert len(state["git_commit"]) == 40
