"""Stage 2 of the benchmark: each method at its stage-1 learning rate on fresh seeds and larger test sets.

Stage 1 (``"tune"``) runs every method over its LR grid on the tuning seeds; :func:`eval_specs`
reads those records back from the same results folder, takes each method's LR by the stage-1 rule
(:func:`.selection.select_lr`: best mean validation metric, never test) and plans the stage-2
(``"eval"``) runs. It refuses, naming every method concerned, when a method has no stage-1 run, lacks
any run of its stage-1 grid on any stage-1 seed (a mean over fewer seeds, or a grid whose extension has
not run everywhere, would pick the LR on other evidence than its peers'), has no successful stage-1 run,
was tried at one LR only, or has its best LR at an edge of its grid (the grid does not bracket the
optimum: extend it in stage 1 first), and when an evaluation seed was used in stage 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .baselines import parse_method
from .formatting import fmt_lr
from .presets import Preset, where_tasks_are
from .roles import is_compared
from .runner import RunSpec
from .selection import LRSelection, Run, dedupe, select_lr, stage_of

EVAL_TEST_OPTIONS: dict[str, dict[str, Any]] = {
    # The text test pool holds 1,276 snippets: 800 more come from the unused end of the training pool.
    "text": {"test_size": 1200, "extra_test_size": 800},
    "lm": {"test_size": 500},  # the whole test pool of the 5,000 word lists
    "vision": {"test_size": 2000},  # from Fashion-MNIST's 10,000 test images
}


@dataclass(frozen=True)
class EvalStage:
    """Stage-2 settings.

    Attributes:
        seeds: evaluation seeds, none of them a stage-1 seed (at least 10 for the verdict).
        test_options: per task, the task options that replace stage 1's for the larger test set
            (disjoint from train and validation; validation and training data stay as in stage 1).
        kept_baselines: by default stage 2 runs this many of PEFT's and the weight-only baselines,
            the best by stage-1 mean validation metric (the best baseline anchors every comparison)...
        always_run: ...plus these baselines, plus every method of ours and every paper baseline.
    """

    seeds: tuple[int, ...] = tuple(range(100, 110))
    test_options: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: dict(EVAL_TEST_OPTIONS))
    kept_baselines: int = 3
    always_run: tuple[str, ...] = ("lora",)


def _stage_one_runs(runs: Sequence[Run], preset: str, task: str) -> dict[str, list[Run]]:
    by_method: dict[str, list[Run]] = {}
    for run in dedupe(runs):
        if stage_of(run) == "tune" and run.get("preset") == preset and run.get("task") == task:
            by_method.setdefault(str(run["method"]), []).append(run)
    return by_method


def _unfinished(preset: Preset, task: str, method: str, runs: Sequence[Run]) -> str | None:
    """Why the method's stage 1 is incomplete (the preset's stage-1 runs of it that have no record,
    failed or not), or None when every (seed, LR) of its grid was run."""
    done = {(int(run["seed"]), float(run["lr"])) for run in runs}
    planned = preset.specs(methods=[method], tasks=[task])
    missing: dict[int, list[float]] = {}
    for spec in planned:
        if (spec.seed, spec.lr) not in done:
            missing.setdefault(spec.seed, []).append(spec.lr)
    if not missing:
        return None
    where = "; ".join(f"seed {seed} at {', '.join(fmt_lr(lr) for lr in lrs)}" for seed, lrs in missing.items())
    count = sum(len(lrs) for lrs in missing.values())
    return (f"stage 1 unfinished, {count} of its {len(planned)} stage-1 runs missing ({where}): "
            "finish them with --stage tune first")


def _selection(method: str, runs: Sequence[Run]) -> tuple[LRSelection | None, str | None]:
    """The method's stage-1 LR choice, or the reason stage 2 cannot use it."""
    if not runs:
        return None, "no stage-1 (tune) run"
    try:
        chosen = select_lr(runs)
    except ValueError:
        return None, f"no successful stage-1 run ({len(runs)} failed)"
    grid = ", ".join(fmt_lr(lr) for lr in chosen.grid)
    if not chosen.swept:
        return chosen, f"tried at one LR only ({grid}): no grid to choose from"
    if chosen.at_edge:
        if chosen.partial:  # the edge of the LRs run on every seed; the rest of the grid is still running
            missing = ", ".join(fmt_lr(lr) for lr in chosen.partial)
            return chosen, (f"best LR {fmt_lr(chosen.lr)} sits at an edge of the LRs run on every seed ({grid} "
                            f"without {missing}, tried on fewer seeds): finish {missing} on every stage-1 seed")
        return chosen, f"best LR {fmt_lr(chosen.lr)} sits at an edge of its grid ({grid}): extend the grid in stage 1"
    return chosen, None


def default_methods(candidates: Sequence[str], stage_one: Mapping[str, Sequence[Run]], settings: EvalStage
                    ) -> list[str]:
    """Every candidate the verdict compares (ours and the paper baselines, :func:`.roles.is_compared`),
    the ``always_run`` baselines, and the ``kept_baselines`` other baselines (PEFT's, weight-only)
    with the best stage-1 mean validation metric, in candidate order.

    A name with a ``+KEY=VALUE`` option (``fisher_zero+source=gradient``) is a stage-1 study of that
    option, which picks the method's default; stage 2 runs the method with its default only (pass
    ``--methods`` to evaluate an option value anyway)."""
    candidates = [method for method in candidates if not parse_method(method).options]
    scored = {}
    for method in candidates:
        if not is_compared(method) and stage_one.get(method):
            try:
                chosen = select_lr(stage_one[method])
            except ValueError:
                continue  # every run failed: not a baseline stage 2 can use
            scored[method] = chosen.val_mean_by_lr[chosen.lr]
    best = sorted(scored, key=lambda m: -scored[m])[: settings.kept_baselines]
    return [m for m in candidates if is_compared(m) or m in best or m in settings.always_run]


def eval_specs(preset: Preset, runs: Sequence[Run], settings: EvalStage | None = None,
               methods: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
               seeds: Sequence[int] | None = None, source: str = "the records given") -> list[RunSpec]:
    """The stage-2 runs of ``preset``: per task, each method (``methods``, else :func:`default_methods`
    of the preset's list) at its stage-1 LR from ``runs`` (the records of the results folder), on
    ``seeds`` (default ``settings.seeds``), with the task options of stage 1 updated by
    ``settings.test_options``. Seed-major, like :meth:`.Preset.specs`. ``source`` names where ``runs``
    came from in error messages (the CLI gives the results file).

    Raises:
        ValueError: an unknown task; no stage-1 run of the task at all (naming ``source`` and the
            command that runs stage 1); an evaluation seed that stage 1 used (naming it); or, listing
            every method concerned, a method with no stage-1 run, a missing stage-1 run (naming its
            seed and LR), no successful stage-1 run, a single LR, or a best LR at an edge of its grid.
    """
    settings = settings or EvalStage()
    chosen_seeds = list(seeds or settings.seeds)
    specs: list[RunSpec] = []
    for task in tasks or list(preset.tasks):
        if task not in preset.tasks:
            raise ValueError(f"preset {preset.name!r} has no task {task!r}; it has {list(preset.tasks)}. "
                             + where_tasks_are([task]))
        plan = preset.tasks[task]
        stage_one = _stage_one_runs(runs, preset.name, task)
        if not stage_one:
            raise ValueError(f"{source} holds no stage-1 (tune) run of preset {preset.name!r}, task {task!r}: "
                             f"stage 2 takes each method's LR from stage 1, so run it first "
                             f"(fisherlora bench --preset {preset.name} with the same --out)")
        reused = sorted({int(run["seed"]) for group in stage_one.values() for run in group} & set(chosen_seeds))
        if reused:
            raise ValueError(f"preset {preset.name!r}, task {task!r}: evaluation seeds {reused} were used in "
                             "stage 1; stage 2 needs fresh seeds")
        planned = list(methods) if methods else default_methods(plan.methods(preset.methods),
                                                                stage_one, settings)
        lrs: dict[str, float] = {}
        problems = []
        for method in planned:
            tried = stage_one.get(method, [])
            chosen, problem = None, _unfinished(preset, task, method, tried) if tried else None
            if problem is None:
                chosen, problem = _selection(method, tried)
            if problem is not None:
                problems.append(f"{method}: {problem}")
            elif chosen is not None:
                lrs[method] = chosen.lr
        if problems:
            raise ValueError(f"stage 2 of preset {preset.name!r}, task {task!r} needs a bracketed stage-1 LR for "
                             f"every method ({source}); {len(problems)} method(s) lack one:\n  "
                             + ";\n  ".join(problems))
        options = {**plan.options, **settings.test_options.get(task, {})}
        for seed in chosen_seeds:
            specs += [RunSpec(task=task, method=method, seed=seed, lr=lrs[method], training=plan.training,
                              fisher=preset.fisher, task_options=dict(options), preset=preset.name, stage="eval")
                      for method in planned]
    return specs

