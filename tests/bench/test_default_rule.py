"""The default-method rule on stage 2: validation ranks by hand, regimes of a task averaged, the
last-ranked variant ruled out, completeness named, and the pick compared with `FisherConfig()`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fisherlora.bench.default_rule import choose_default, format_default_choice, library_default
from fisherlora.bench.results import load_runs
from fisherlora.bench.summary import summarize
from fisherlora.bench.verdict import verdict
from fisherlora.bench.verdict_report import format_verdict
from fisherlora.config import FisherConfig

from .records import make_run

RESULTS = Path(__file__).resolve().parents[2] / "results"


TASKS = ("text", "vision")  # the synthetic results' tasks: the rule covers these here


def _runs(task: str, validation: dict[str, float], seeds: int = 3, preset: str | None = None,
          stage_two: bool = True) -> list[dict[str, Any]]:
    """Stage 1 (every method best at LR 1e-3 on validation) and, unless ``stage_two`` is False, stage 2 at
    1e-3 on ``seeds`` evaluation seeds whose validation metric averages ``validation[method]``."""
    preset = preset or task
    runs = [make_run(m, lr, 0, 0.9 if lr == 1e-3 else 0.5, 0.5, task=task, preset=preset,
                     run_id=f"{preset}/{task}/{m}/{lr}") for m in validation for lr in (1e-4, 1e-3, 1e-2)]
    if stage_two:
        for method, value in validation.items():
            for index, offset in enumerate((-0.01, 0.01, 0.0)[:seeds] if seeds <= 3 else [0.0] * seeds):
                runs.append(make_run(method, 1e-3, 100 + index, value + offset, 0.5, task=task, preset=preset,
                                     stage="eval", run_id=f"{preset}/{task}/{method}/eval/{index}"))
    return runs


def _three_tasks(seeds: int = 3) -> list[dict[str, Any]]:
    # text:      lora .80 (1), fisher_eig .78 (2), fisher_svd .70 (4), fisher_zero .75 (3)
    # text-long: lora .80 (1), fisher_eig .70 (4), fisher_svd .76 (2), fisher_zero .72 (3)
    #   -> task text: lora 1, fisher_eig 3, fisher_svd 3, fisher_zero 3
    # vision:    gaussian .90 (1), fisher_eig .85 (3), fisher_svd .88 (2), fisher_zero .80 (4)
    # mean ranks: fisher_eig 3, fisher_svd 2.5, fisher_zero 3.5 (last on vision and, tied, on text)
    return [
        *_runs("text", {"lora": 0.80, "fisher_eig": 0.78, "fisher_svd": 0.70, "fisher_zero": 0.75}, seeds),
        *_runs("text", {"lora": 0.80, "fisher_eig": 0.70, "fisher_svd": 0.76, "fisher_zero": 0.72}, seeds,
               preset="text-long"),
        *_runs("vision", {"gaussian": 0.90, "fisher_eig": 0.85, "fisher_svd": 0.88, "fisher_zero": 0.80}, seeds),
    ]


def test_ranks_by_hand_regimes_averaged_and_last_ruled_out() -> None:
    choice = choose_default(summarize(_three_tasks()), seeds_needed=3, tasks=TASKS)
    by_method = {c.method: c for c in choice.candidates}
    assert dict(by_method["fisher_svd"].task_ranks) == {"text": 3.0, "vision": 2.0}
    assert dict(by_method["fisher_eig"].task_ranks) == {"text": 3.0, "vision": 3.0}
    assert by_method["fisher_zero"].mean_rank == pytest.approx(3.5)
    assert [c.method for c in choice.candidates] == ["fisher_svd", "fisher_eig", "fisher_zero"]
    # All three tie on text (rank 3): nobody is behind anybody there. fisher_zero is last on vision.
    assert {c.method: c.last_on for c in choice.candidates} == {
        "fisher_svd": (), "fisher_eig": (), "fisher_zero": ("vision",)}
    assert choice.pick == "fisher_svd" and choice.complete


def test_no_pick_when_every_variant_is_last_somewhere() -> None:
    runs = [*_runs("text", {"lora": 0.80, "fisher_eig": 0.79, "fisher_svd": 0.70}),
            *_runs("vision", {"gaussian": 0.90, "fisher_eig": 0.80, "fisher_svd": 0.89})]
    choice = choose_default(summarize(runs), seeds_needed=3, tasks=TASKS)
    assert choice.pick is None and all(c.last_on for c in choice.candidates)
    assert "picks none" in format_default_choice(choice)


def test_pick_is_the_best_mean_rank_never_last() -> None:
    runs = [*_runs("text", {"lora": 0.80, "fisher_eig": 0.79, "fisher_svd": 0.70, "fisher_zero": 0.75}),
            *_runs("vision", {"gaussian": 0.90, "fisher_eig": 0.80, "fisher_svd": 0.89, "fisher_zero": 0.85})]
    # text: eig 2, zero 3, svd 4 (last); vision: svd 2, zero 3, eig 4 (last) -> zero (mean 3) is the pick
    # although svd and eig have the same mean rank.
    choice = choose_default(summarize(runs), seeds_needed=3, tasks=TASKS)
    assert {c.method: c.mean_rank for c in choice.candidates} == {"fisher_eig": 3.0, "fisher_svd": 3.0,
                                                                  "fisher_zero": 3.0}
    assert {c.method: c.last_on for c in choice.candidates} == {
        "fisher_eig": ("vision",), "fisher_svd": ("text",), "fisher_zero": ()}
    assert choice.pick == "fisher_zero" and choice.complete
    assert not choice.pick_is_default
    assert "change the default" in format_default_choice(choice)


def test_incomplete_stage_two_is_named_and_keeps_the_pick_provisional() -> None:
    runs = [*_runs("text", {"lora": 0.80, "fisher_eig": 0.79, "fisher_svd": 0.70}, seeds=2),
            *_runs("text", {"lora": 0.80, "fisher_eig": 0.79}, preset="text-long", stage_two=False),
            *_runs("vision", {"gaussian": 0.9, "fisher_eig": 0.85, "fisher_svd": 0.8}, seeds=3)]
    vision_tune = [r for r in _runs("vision", {"fisher_grad": 0.5, "fisher_zero+source=weight": 0.5},
                                    stage_two=False)]
    choice = choose_default(summarize(runs + vision_tune), seeds_needed=3, tasks=TASKS)
    assert not choice.complete
    reasons = " / ".join(choice.incomplete)
    assert "text-long/text: no stage-2 runs" in reasons
    assert "vision: no stage-2 run of fisher_grad" in reasons and "source=weight" not in reasons  # an option study
    assert "text: 3 of 3 methods below 3 seeds (fewest 2)" in reasons
    text = format_default_choice(choice)
    assert "Provisional" in text and "change the default" not in text
    assert choice.pick == "fisher_eig"
    assert choice.pick_is_default == (FisherConfig().method == "fisher_eig")


def test_library_default_follows_fisher_config(monkeypatch: pytest.MonkeyPatch) -> None:
    assert library_default() == FisherConfig().method
    changed = replace(FisherConfig(), method="fisher_svd", rank_allocation="fisher", fisher="true")
    monkeypatch.setattr("fisherlora.bench.default_rule.FisherConfig", lambda: changed)
    assert library_default() == "fisher_svd+alloc@true"
    choice = replace(choose_default(summarize(_three_tasks()), seeds_needed=3, tasks=TASKS),
                     library_default=library_default())
    assert not choice.pick_is_default  # fisher_svd without +alloc@true
    assert replace(choice, pick="fisher_svd+alloc@true").pick_is_default


def test_verdict_report_carries_the_rule() -> None:
    result = verdict(summarize(_three_tasks()))
    assert result.default is not None and result.default.pick == "fisher_svd"
    text = format_verdict(result)
    assert "## Default method (validation metrics only)" in text and "**fisher_svd**" in text


def test_committed_default_follows_the_rule_once_stage_two_is_complete() -> None:
    summaries = [s for name in ("text", "text-long", "lm", "vision") if (RESULTS / name / "runs.jsonl").is_file()
                 for s in summarize(load_runs(RESULTS / name))]
    choice = choose_default(summaries)
    if not choice.complete:
        pytest.skip("stage 2 not complete: " + "; ".join(choice.incomplete))
    assert choice.pick_is_default, (f"the default-method rule picks {choice.pick} on the committed stage 2; "
                                    f"FisherConfig() runs {choice.library_default}")


def test_a_report_of_some_tasks_gives_no_default_advice() -> None:
    # One task folder ranks the variants on that task only: `fisherlora report results/text` used to
    # end with "change the default" for the text task's own pick.
    runs = [*_runs("text", {"lora": 0.80, "fisher_eig": 0.79, "fisher_svd": 0.70, "fisher_zero": 0.75}),
            *_runs("vision", {"gaussian": 0.90, "fisher_eig": 0.80, "fisher_svd": 0.89, "fisher_zero": 0.85})]
    choice = choose_default(summarize(runs), seeds_needed=3)  # the rule's own tasks: text, lm and vision
    assert not choice.complete and choice.incomplete[0] == "no stage-2 results of lm (the rule covers text, lm, vision)"
    assert "change the default" not in format_default_choice(choice)
