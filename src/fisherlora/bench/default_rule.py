"""Which Fisher variant `FisherConfig()` should run: the default-method rule, applied to stage 2.

The rule reads validation metrics only (a test metric never picks anything): on each stage-2 task,
every method is ranked by its mean validation metric over the evaluation seeds (1 = best, ties share
their mean rank, :func:`.summary.rank_of`; a task run in several regimes, e.g. ``text`` and
``text-long``, takes the mean of its regime ranks, as the verdict pools them). The candidates are the
Fisher variants with a result on every task; a candidate ranked last among the candidates on any
task (behind at least one other) is ruled out, since a default must not be the worst choice
anywhere; of the others, the one with the best mean rank over tasks is the pick (ties: the first in
display order).

The pick is provisional until stage 2 is complete: every benchmark task has stage-2 runs (a report
of one task does not pick the library's default), every regime with stage-1 runs has stage-2 runs,
every method compared in stage 1 runs in stage 2 (but the stage-1 studies of an option or a
sketch), and every stage-2 method has the evaluation seeds the verdict asks for
(:class:`.stages.EvalStage`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import FisherConfig
from .baselines import parse_method
from .roles import is_baseline, is_compared, method_order
from .stages import EvalStage
from .summary import TaskSummary, rank_of


@dataclass(frozen=True)
class Candidate:
    """One Fisher variant under the rule.

    Attributes:
        method: the benchmark method name (``fisher_eig+alloc``).
        task_ranks: per task (name, in summary order), its validation rank among that task's methods.
        mean_rank: mean of ``task_ranks``.
        last_on: the tasks where it ranks last among the candidates, behind at least one of them
            (ruled out when not empty).
    """

    method: str
    task_ranks: tuple[tuple[str, float], ...]
    mean_rank: float
    last_on: tuple[str, ...]


@dataclass(frozen=True)
class DefaultChoice:
    """The rule's result.

    Attributes:
        candidates: every candidate, best mean rank first.
        pick: the chosen method name, None when every candidate is ruled out or there is none.
        library_default: the method name `FisherConfig()` runs (with ``+alloc``/``@true`` when its
            defaults say so).
        incomplete: why stage 2 is not complete yet (empty when it is).
    """

    candidates: tuple[Candidate, ...]
    pick: str | None
    library_default: str
    incomplete: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.incomplete

    @property
    def pick_is_default(self) -> bool:
        """Whether the pick runs with the same settings as `FisherConfig()` (suffix order aside)."""
        return self.pick is not None and parse_method(self.pick) == parse_method(self.library_default)


def library_default() -> str:
    """The benchmark method name of what `FisherConfig()` runs (options at the method's defaults)."""
    config = FisherConfig()
    suffix = "+alloc" if config.rank_allocation == "fisher" else ""
    return f"{config.method}{suffix}{'@true' if config.fisher == 'true' else ''}"


def _scored_validation(summary: TaskSummary) -> dict[str, float]:
    return {m.method: m.val_mean for m in summary.methods if m.best_lr is not None and math.isfinite(m.val_mean)}


def _planned(method: str) -> bool:
    """Whether stage 2 runs ``method`` by default after stage 1 ran it: every compared method but the
    stage-1 studies of an option (``+KEY=VALUE``, see :func:`.stages.default_methods`) or of a sketch."""
    parsed = parse_method(method)
    return is_compared(method) and not parsed.options and parsed.sketch_rank is None


def _incomplete(summaries: Sequence[TaskSummary], seeds_needed: int, tasks: Sequence[str]) -> list[str]:
    evals = {(s.preset, s.task): s for s in summaries if s.stage == "eval"}
    present = {task for _, task in evals}
    absent = [task for task in tasks if task not in present]
    # A report of some tasks only ranks the variants on those: the rule is over every task.
    reasons = [f"no stage-2 results of {', '.join(absent)} (the rule covers {', '.join(tasks)})"] if absent else []
    for tune in (s for s in summaries if s.stage == "tune"):
        stage_two = evals.get((tune.preset, tune.task))
        if stage_two is None:
            reasons.append(f"{tune.label}: no stage-2 runs")
            continue
        running = {m.method for m in stage_two.methods}
        missing = [m.method for m in tune.methods if _planned(m.method) and m.method not in running]
        if missing:
            reasons.append(f"{tune.label}: no stage-2 run of {', '.join(missing)}")
    for summary in evals.values():
        short = [m for m in summary.methods if len(m.seeds) < seeds_needed]
        if short:
            fewest = min(len(m.seeds) for m in short)
            reasons.append(f"{summary.label}: {len(short)} of {len(summary.methods)} methods below "
                           f"{seeds_needed} seeds (fewest {fewest})")
    return reasons


def _last(method: str, candidate_ranks: list[float], ranks: dict[str, float]) -> bool:
    """Whether ``method`` ranks last among the candidates on a task: at their worst rank, which some
    candidate beats (where every candidate ties, none is worse than another)."""
    return ranks[method] == max(candidate_ranks) > min(candidate_ranks)


def choose_default(summaries: Sequence[TaskSummary], seeds_needed: int | None = None,
                   tasks: Sequence[str] | None = None) -> DefaultChoice:
    """The default-method rule on the stage-2 summaries among ``summaries`` (stage-1 ones only say
    which regimes stage 2 must cover).

    Args:
        summaries: task summaries of every results folder (:func:`.summary.summarize`).
        seeds_needed: evaluation seeds per method for stage 2 to count as complete (default: as many
            as `EvalStage` plans).
        tasks: the tasks the rule covers; stage 2 is incomplete while one has no stage-2 results
            (default: those of the `full` preset, every benchmark task).
    """
    from .presets import PRESETS

    needed = len(EvalStage().seeds) if seeds_needed is None else seeds_needed
    covered = tuple(PRESETS["full"].tasks) if tasks is None else tuple(tasks)
    regime_ranks: dict[str, dict[str, list[float]]] = {}
    for summary in (s for s in summaries if s.stage == "eval"):
        for method, rank in rank_of(_scored_validation(summary)).items():
            regime_ranks.setdefault(summary.task, {}).setdefault(method, []).append(rank)
    by_task = {task: {method: float(np.mean(ranks)) for method, ranks in by_method.items()}
               for task, by_method in regime_ranks.items()}
    ours = [m for m in method_order({m for ranks in by_task.values() for m in ranks}) if not is_baseline(m)]
    eligible = [m for m in ours if by_task and all(m in ranks for ranks in by_task.values())]
    candidates = [Candidate(
        method=m, task_ranks=tuple((task, ranks[m]) for task, ranks in by_task.items()),
        mean_rank=float(np.mean([ranks[m] for ranks in by_task.values()])),
        last_on=tuple(task for task, ranks in by_task.items() if _last(m, [ranks[c] for c in eligible], ranks)),
    ) for m in eligible]
    ordered = sorted(candidates, key=lambda c: c.mean_rank)  # stable: display order breaks ties
    pick = next((c.method for c in ordered if not c.last_on), None)
    return DefaultChoice(candidates=tuple(ordered), pick=pick, library_default=library_default(),
                         incomplete=tuple(_incomplete(summaries, needed, covered)))


def format_default_choice(choice: DefaultChoice) -> str:
    """Markdown: the rule, the candidates' ranks, the pick and what to do with it."""
    if not choice.candidates:
        return "## Default method\n\nNo Fisher variant has a stage-2 result on every task yet."
    tasks = [task for task, _ in choice.candidates[0].task_ranks]
    head = ["variant", *[f"rank, {task}" for task in tasks], "mean rank", "last among the variants on"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in choice.candidates:
        ranks = [f"{rank:g}" for _, rank in c.task_ranks]
        lines.append(f"| {c.method} | " + " | ".join(ranks) + f" | {c.mean_rank:.2f} | {', '.join(c.last_on) or '–'} |")
    if choice.pick is None:
        outcome = "Every candidate is last on some task: the rule picks none."
    elif choice.pick_is_default:
        outcome = f"The rule picks **{choice.pick}**, which `FisherConfig()` runs."
    else:
        outcome = (f"The rule picks **{choice.pick}**; `FisherConfig()` runs `{choice.library_default}`"
                   + (": change the default." if choice.complete else "."))
    status = ("Stage 2 is complete." if choice.complete else
              "Provisional: stage 2 is not complete (" + "; ".join(choice.incomplete) + ").")
    return ("## Default method (validation metrics only)\n\n"
            "Each task ranks every stage-2 method by its mean validation metric (1 = best; a task's regimes "
            "averaged). Among the Fisher variants with a result on every task, those ranked last among them on "
            "some task (behind at least one) are ruled out; the best mean rank of the others is the pick.\n\n"
            + "\n".join(lines) + f"\n\n{outcome} {status}")
