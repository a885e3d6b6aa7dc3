"""Re-executed runs against the committed records of the same run ids: how far a code change (or
another machine) moved the benchmark's results (`fisherlora compare-runs REFERENCE RERUN`).

A rerun is made with `fisherlora bench --out RERUN ...` on the same preset, stage, seeds and methods;
for stage 2 the rerun folder first gets a copy of the reference's stage-1 records, from which the
learning rates are picked as they were.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .results import load_runs
from .selection import is_failed


@dataclass(frozen=True)
class RunDifference:
    """One run id present in both folders.

    Attributes:
        run_id, method, seed, lr: the run.
        reference_commit, rerun_commit: the code each was made with (`git_commit` of the records,
            `+dirty` when the working tree had uncommitted changes).
        val, test, final_loss: `(reference, rerun)` validation metric, test metric, final smoothed
            training loss.
        curve: the largest `|reference - rerun|` over the training-loss curve's points.
        test_examples: the test set's size (`test_size + extra_test_size` of the run's task options),
            or None when the records do not say.
        same_machine: whether both records name the same machine (platform string, and the CPU
            kernels' instruction set and torch threads where both record them); None when one does not say.
    """

    run_id: str
    method: str
    seed: int
    lr: float
    reference_commit: str
    rerun_commit: str
    val: tuple[float, float]
    test: tuple[float, float]
    final_loss: tuple[float, float]
    curve: float
    test_examples: int | None
    same_machine: bool | None = True

    @property
    def test_examples_moved(self) -> float | None:
        """`|delta test accuracy| x test size`: how many test predictions the difference amounts to."""
        if self.test_examples is None:
            return None
        return abs(self.test[1] - self.test[0]) * self.test_examples


def _same_machine(first: dict[str, Any], second: dict[str, Any]) -> bool | None:
    """Same platform, CPU kernels' instruction set and torch threads (those both record); None when
    either record names no machine."""
    one, other = first.get("machine") or {}, second.get("machine") or {}
    if not one or not other:
        return None
    keys = [key for key in ("platform", "cpu_capability", "torch_threads") if key in one and key in other]
    return all(one[key] == other[key] for key in keys)


def _code(record: dict[str, Any]) -> str:
    commit = str(record.get("git_commit", "?"))[:10]
    return f"{commit}+dirty" if record.get("git_dirty") else commit


def _test_examples(record: dict[str, Any]) -> int | None:
    options = record.get("config", {}).get("task_options", {})
    if "test_size" not in options:
        return None
    return int(options["test_size"]) + int(options.get("extra_test_size", 0))


def _times(record: dict[str, Any]) -> tuple[Any, Any, Any]:
    return record["run_id"], record.get("started"), record.get("finished")


def compare_runs(reference: list[dict[str, Any]], rerun: list[dict[str, Any]]) -> list[RunDifference]:
    """Every rerun record next to the (latest) reference record of its run id, in the rerun's order. A
    rerun record with the start and finish times of a reference record of its run id is a copy (the
    stage-1 records a stage-2 rerun reads its LRs from), not a rerun, and is skipped.

    Raises:
        ValueError: a rerun record has no reference record of its run id, either of a pair failed,
            or the two curves were sampled at different steps (naming the run id).
    """
    by_id = {record["run_id"]: record for record in reference}  # a run recorded twice: its latest record
    copies = {_times(record) for record in reference if None not in _times(record)[1:]}
    unmatched = [record["run_id"] for record in rerun if record["run_id"] not in by_id]
    if unmatched:
        raise ValueError(f"{len(unmatched)} run(s) of the rerun have no record in the reference folder (first: "
                         f"{unmatched[0]!r}): the rerun must use the same preset, settings, seeds and learning rates, "
                         "and the reference folder comes first")
    differences = []
    for new in rerun:
        old = by_id[new["run_id"]]
        if _times(new) in copies:
            continue
        for which, record in (("reference", old), ("rerun", new)):
            if is_failed(record):
                raise ValueError(f"run {new['run_id']!r} failed in the {which}: {record.get('error')}")
        if old["curve"]["step"] != new["curve"]["step"]:
            raise ValueError(f"run {new['run_id']!r}: the curves are sampled at different steps")
        curve = max(abs(a - b) for a, b in zip(old["curve"]["train_loss"], new["curve"]["train_loss"], strict=True))
        differences.append(RunDifference(
            run_id=new["run_id"], method=new["method"], seed=int(new["seed"]), lr=float(new["lr"]),
            reference_commit=_code(old), rerun_commit=_code(new),
            val=(old["val_metric"], new["val_metric"]), test=(old["test_metric"], new["test_metric"]),
            final_loss=(old["final_train_loss"], new["final_train_loss"]), curve=curve,
            test_examples=_test_examples(new), same_machine=_same_machine(old, new)))
    return differences


def format_comparison(differences: list[RunDifference], reference_dir: str, rerun_dir: str) -> str:
    """A markdown table of `differences`, one row per run, and the largest differences below it."""
    runs = "run" if len(differences) == 1 else "runs"
    lines = [f"### Rerun of {len(differences)} {runs}: `{rerun_dir}` against `{reference_dir}`", "",
             "| method | seed | lr | reference code | rerun code | machine | val (ref -> rerun) | "
             "test (ref -> rerun) | net test predictions moved | final loss (ref -> rerun) | max curve difference |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for item in differences:
        moved = "-" if item.test_examples_moved is None else f"{item.test_examples_moved:.0f} of {item.test_examples}"
        machine = {True: "same", False: "other", None: "?"}[item.same_machine]
        lines.append(f"| {item.method} | {item.seed} | {item.lr:g} | {item.reference_commit} | {item.rerun_commit} | "
                     f"{machine} | "
                     f"{item.val[0]:.4f} -> {item.val[1]:.4f} | {item.test[0]:.4f} -> {item.test[1]:.4f} | {moved} | "
                     f"{item.final_loss[0]:.4f} -> {item.final_loss[1]:.4f} | {item.curve:.2e} |")
    if differences:
        lines += ["", f"Largest |difference|: validation {max(abs(d.val[1] - d.val[0]) for d in differences):.4f}, "
                      f"test {max(abs(d.test[1] - d.test[0]) for d in differences):.4f}, "
                      f"training-loss curve {max(d.curve for d in differences):.2e}. machine: the platform (and the "
                      "instruction set of torch's CPU kernels and torch threads, where recorded) of both records, same "
                      "or other. net test predictions moved: |change of test accuracy| x test size (predictions that "
                      "changed both ways cancel)."]
    return "\n".join(lines)


def compare_folders(reference_dir: str | os.PathLike[str], rerun_dir: str | os.PathLike[str]) -> str:
    """`format_comparison` of the two folders' `runs.jsonl` (only the rerun's runs are compared)."""
    folders = {}
    for role, folder in (("reference", reference_dir), ("rerun", rerun_dir)):
        if not (Path(folder) / "runs.jsonl").is_file():
            raise ValueError(f"the {role} folder {str(folder)!r} has no runs.jsonl")
        folders[role] = load_runs(folder)
    differences = compare_runs(folders["reference"], folders["rerun"])
    if not differences:
        raise ValueError(f"every run of {Path(rerun_dir) / 'runs.jsonl'} is a copy of a reference record (same start "
                         "and finish times): nothing was rerun")
    return format_comparison(differences, str(reference_dir), str(rerun_dir))
