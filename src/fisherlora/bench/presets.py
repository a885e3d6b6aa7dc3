"""Benchmark presets: which tasks, methods, seeds and learning rates, and how big each run is.

`quick` is the README's main job (one task, every method, one seed, one LR, minutes on 2 CPU
cores); `full` follows the protocol in docs/protocol.md (LR grid of 3+, 3+ seeds, 3 tasks).

Method lists are not typed here: every preset runs every method of the catalogue
(`fisherlora.init.catalog`) with its benchmark variants, so a newly registered method is
benchmarked without editing this file; the third value of a task's LR grid follows the method's
declared `zero_start`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..config import FisherConfig
from ..init.catalog import get_method, ordered_entries
from .baselines import parse_method
from .runner import RunSpec, TrainingConfig


def benchmark_methods(variants: bool = True) -> list[str]:
    """Every catalogue method, then (unless `variants=False`) every declared benchmark variant (e.g.
    `fisher_svd@true`, `fisher_zero+alloc`, `fisher_zero+source=gradient`)."""
    entries = ordered_entries()
    names = [entry.name for entry in entries]
    return names + [entry.name + variant for entry in entries for variant in entry.benchmark_variants] if variants \
        else names


def linear_view_methods() -> list[str]:
    """PEFT implements these for nn.Linear only; on the vision task's 1x1 convolutions they run on
    the same layers rewritten as nn.Linear (bench/pointwise.py), the plain names failing as PEFT does."""
    return [f"{entry.name}+linear" for entry in ordered_entries() if entry.linear_only]


def is_zero_start(method: str) -> bool:
    """Whether a benchmark method's adapter starts at zero (its catalogue entry says so)."""
    return get_method(parse_method(method).name).zero_start


@dataclass
class TaskPlan:
    """One task inside a preset.

    Attributes:
        lrs: the learning-rate grid every method is tried on.
        training: shared training settings.
        options: the task's own config overrides (subset sizes, lengths).
        third_lr: `(zero_start, other)`: one more grid value per method, the first for methods whose
            adapter starts at zero (they take larger learning rates), the second for the others.
        method_lrs: extra learning rates for some methods (grid extensions where a method's best
            LR sat at an edge), added to that method's grid.
        linear_view: also run PEFT's linear-only methods as `NAME+linear` (after the others,
            unless `--methods` is given).
    """

    lrs: list[float]
    training: TrainingConfig
    options: dict[str, Any] = field(default_factory=dict)
    third_lr: tuple[float, float] | None = None
    method_lrs: dict[str, list[float]] = field(default_factory=dict)
    linear_view: bool = False

    def methods(self, methods: list[str]) -> list[str]:
        """The preset's methods on this task, with the linear views when the task asks for them."""
        return [*methods, *linear_view_methods()] if self.linear_view else list(methods)

    def grid(self, method: str) -> list[float]:
        """The learning rates `method` is tried on, ascending."""
        grid = set(self.lrs) | set(self.method_lrs.get(method, []))
        if self.third_lr is not None:
            grid.add(self.third_lr[0] if is_zero_start(method) else self.third_lr[1])
        return sorted(grid)


@dataclass
class Preset:
    name: str
    description: str
    tasks: dict[str, TaskPlan]
    seeds: list[int]
    method_list: list[str] | None = None  # None: every catalogue method (`benchmark_methods(variants)`)
    # With the catalogue's benchmark variants (`@true`, `+alloc`, `+KEY=VALUE`) when method_list is None.
    variants: bool = True
    # Pinned rather than FisherConfig's defaults: the config is part of every run id, so a change
    # of library default (e.g. the default method, which each run overrides anyway) must not
    # make a resumed benchmark re-run finished runs.
    fisher: FisherConfig = field(default_factory=lambda: FisherConfig(progress=False, method="fisher_select"))

    @property
    def methods(self) -> list[str]:
        """The methods every task of the preset runs (live: a newly registered method is included)."""
        return list(self.method_list) if self.method_list is not None else benchmark_methods(self.variants)

    def specs(self, methods: list[str] | None = None, tasks: list[str] | None = None,
              seeds: list[int] | None = None) -> list[RunSpec]:
        """Every run of the preset (optionally restricted), ordered seed-major so that an
        interrupted benchmark has complete seeds for every method first."""
        chosen_tasks = tasks or list(self.tasks)
        unknown = [task for task in chosen_tasks if task not in self.tasks]
        if unknown:
            raise ValueError(f"preset {self.name!r} has no task {unknown}; it has {list(self.tasks)}. "
                             + where_tasks_are(unknown))
        specs = []
        for task in chosen_tasks:
            plan = self.tasks[task]
            for seed in seeds or self.seeds:
                for method in methods or plan.methods(self.methods):
                    for lr in plan.grid(method):
                        specs.append(RunSpec(task=task, method=method, seed=seed, lr=lr, training=plan.training,
                                             fisher=self.fisher, task_options=dict(plan.options), preset=self.name))
        return specs


TEXT_SMALL = {"train_size": 768, "val_size": 200, "test_size": 400, "max_length": 48}
TEXT_FULL = {"train_size": 1200, "val_size": 300, "test_size": 600, "max_length": 48}
# 60 steps at batch 8: an lm run costs ~1.5-2 min on one CPU thread (SmolLM2 forward+backward
# ~1.1 s/step, greedy evaluation of 300 prompts ~20 s), which is what fits 126 runs on 2 cores.
LM_FULL = {"train_size": 480, "val_size": 100, "test_size": 200, "max_length": 48}
VISION_FULL = {"train_size": 1600, "val_size": 400, "test_size": 1000, "image_size": 64}


def _presets() -> dict[str, Preset]:
    text_training = TrainingConfig(rank=8, alpha=16, batch_size=16, epochs=1, calibration_batches=8,
                                   calibration_batch_size=16)
    text_full_training = replace(text_training, calibration_batches=16)
    lm_training = TrainingConfig(rank=8, alpha=16, batch_size=8, epochs=1, calibration_batches=8,
                                 calibration_batch_size=8)
    vision_training = TrainingConfig(rank=8, alpha=16, batch_size=32, epochs=1, calibration_batches=8,
                                     calibration_batch_size=32)
    # Seen here: at 75 steps every method, PiSSA included, stays at the majority class below
    # 1e-3 (the new head learns at the same LR), so the text grid is the same for all methods.
    text_full = TaskPlan(lrs=[1e-3, 3e-3, 1e-2], training=text_full_training, options=TEXT_FULL)
    # Seen here (lm, seed 0, 60 steps): LoRA's validation exact match rose 0.07 / 0.15 / 0.28 / 0.37 at
    # LR 3e-4 / 1e-3 / 3e-3 / 1e-2, and PiSSA, fisher_eig and fisher_grad peaked at 3e-3, the top of
    # their grid: at this short budget every method wants high LRs, so the grid sits high.
    # Seen on seed 0 of that grid: MiLoRA, LoRA-GA, fisher_eig and fisher_grad peaked at its top (1e-2),
    # fisher_select at its bottom (1e-3); each grid is extended by one value on that side.
    lm_extensions = {method: [3e-2] for method in ("milora", "lora_ga", "fisher_eig", "fisher_grad",
                                                   "fisher_grad@true")}
    lm_extensions["fisher_select"] = [3e-4]
    # Seen on seeds 0-2 of the methods added later: LoRA-One's, LoRA-DA's and fisher_step's best LR sat at
    # the top (1e-2).
    lm_extensions.update({"lora_one": [3e-2], "lora_da": [3e-2], "fisher_step": [3e-2]})
    # Seen on seeds 0-2 of the +alloc variants: fisher_step+alloc's, fisher_grad+alloc's and
    # fisher_eig+alloc's best LR sat at the top (1e-2).
    lm_extensions.update({"fisher_step+alloc": [3e-2], "fisher_grad+alloc": [3e-2], "fisher_eig+alloc": [3e-2]})
    lm_full = TaskPlan(lrs=[3e-3, 1e-2], training=lm_training, options=LM_FULL, third_lr=(3e-2, 1e-3),
                       method_lrs=lm_extensions)
    # Seen on seeds 0-1: MiLoRA's and fisher_eig's best LR sat at the grid's top (3e-3).
    vision_extensions = {"milora": [1e-2], "fisher_eig": [1e-2]}
    # Seen on all seeds: EVA's and CorDA's best LR on the linear view sat at the grid's bottom.
    vision_extensions["eva+linear"] = [3e-4]
    vision_extensions["corda+linear"] = [1e-4]
    # Seen on seeds 0-2 of the methods added later: LoRA-One's and LoRA-DA's best LR sat at the grid's
    # top (3e-3), LoRA-GA (paper scale)'s at its bottom (3e-4), fisher_zero's (natural-gradient and
    # weight sources) at its bottom (1e-3).
    vision_extensions.update({"lora_one": [1e-2], "lora_da": [1e-2], "lora_ga_paper": [1e-4], "fisher_zero": [3e-4],
                              "fisher_zero+source=weight": [3e-4]})
    # Seen on seeds 0-2 of the +alloc variants: fisher_zero's best LR at its grid's bottom (1e-3),
    # fisher_step's at its top (3e-3).
    vision_extensions.update({"fisher_zero+alloc": [3e-4], "fisher_step+alloc": [1e-2]})
    vision_full = TaskPlan(lrs=[1e-3, 3e-3], training=vision_training, options=VISION_FULL, third_lr=(1e-2, 3e-4),
                           method_lrs=vision_extensions, linear_view=True)
    return {
        "quick": Preset(
            name="quick",
            description="text task on a subset, every method (no variants), one seed, one learning rate "
                        "(minutes on 2 cores)",
            tasks={"text": TaskPlan(lrs=[3e-3], training=text_training, options=TEXT_SMALL)},
            seeds=[0],
            # The variants (@true, +alloc, +source=...) would more than double it; the protocol presets run them.
            variants=False,
        ),
        "text": Preset("text", "text task: LR grid x 3 seeds, every method", {"text": text_full}, [0, 1, 2]),
        "lm": Preset("lm", "causal-LM task: LR grid x 3 seeds, every method", {"lm": lm_full}, [0, 1, 2]),
        "vision": Preset("vision", "vision task: LR grid x 3 seeds, every method", {"vision": vision_full},
                         [0, 1, 2]),
        "full": Preset("full", "all three tasks: LR grid x 3 seeds, every method",
                       {"text": text_full, "lm": lm_full, "vision": vision_full}, [0, 1, 2]),
    }


PRESETS: dict[str, Preset] = _presets()


# ----------------------------------------------------------------------------- long text regime
# The `text` task with 4x its optimizer steps (4,800 training snippets at batch 16, one epoch: 300
# steps instead of 75), with its own stage 1 since the best LR moves with the training length, and
# its own stage 2 (`--stage eval`, same evaluation seeds and test set as `text`). The grid is
# `text`'s: on `text` every method's best LR is its middle value, 3e-3, and on `text-long` seed 0
# LoRA's validation accuracy still rose up to 3e-3 (0.743, 0.760, 0.777 at 3e-4, 1e-3, 3e-3), so
# the first guess, one step lower ({3e-4, 1e-3, 3e-3}), would have put the best LR at its top
# edge. Stage 2 refuses any method whose best LR lands at an edge, and the grid is extended there.
TEXT_LONG = {**TEXT_FULL, "train_size": 4800}


def _long_presets() -> dict[str, Preset]:
    # Seen on stage 1 (seeds 0-1 for LoRA and Gaussian, seed 0 for the others): 1e-2 collapses to the
    # majority class for every method so far, and the best LR of LoRA, Gaussian, EVA, LoRA-GA and LoRA-GA
    # (paper scale) sat at the grid's bottom (1e-3). Then, with 16 methods on seed 0 and 6 on seed 1:
    # CorDA's and OLoRA's (a tie with 3e-3 goes to the smaller LR) on both seeds, and on seed 0
    # fisher_svd's, fisher_zero's (3e-3 collapses), fisher_grad's and fisher_eig's (a tie).
    # Then, with 129 of those runs in (every method on seed 0, 12 on seed 1): lora_da's and lora_one's on
    # both seeds (val 0.753/0.797 and 0.750/0.797 at 1e-3), and on seed 0 those of fisher_grad+alloc and
    # fisher_step+alloc (3e-3 collapses), fisher_zero+alloc, fisher_svd@true, fisher_zero+source=gradient,
    # fisher_select+alloc (0.767 against 0.763) and fisher_svd+alloc (a tie, 0.770). With 157 in:
    # fisher_select's and milora's on both seeds means (seed 1 at 1e-3: 0.817 and 0.797). With 195 in:
    # fisher_step's (mean 0.785 at 1e-3 against 0.777) and fisher_grad@true's (3e-3 collapses on seed 1).
    # With 209 in: fisher_zero+source=weight's (seed 1 moved the mean to 0.788 at 1e-3 against 0.778).
    extensions: dict[str, list[float]] = {name: [3e-4] for name in (
        "lora", "gaussian", "eva", "lora_ga", "lora_ga_paper", "corda", "olora", "fisher_svd", "fisher_eig",
        "fisher_zero", "fisher_grad", "lora_da", "lora_one", "fisher_grad+alloc", "fisher_step+alloc",
        "fisher_zero+alloc", "fisher_svd@true", "fisher_zero+source=gradient", "fisher_select+alloc",
        "fisher_svd+alloc", "fisher_select", "milora", "fisher_step", "fisher_grad@true",
        "fisher_zero+source=weight")}
    plan = TaskPlan(lrs=[1e-3, 3e-3, 1e-2], training=PRESETS["text"].tasks["text"].training, options=TEXT_LONG,
                    method_lrs=extensions)
    # Two tuning seeds where `text` has three (the protocol asks for 2-3): a text-long run costs ~4 min of
    # one CPU thread, and the third seed would add ~84 runs (~5.5 CPU hours) to stage 1 alone.
    return {"text-long": Preset("text-long", "text task with 4x the training steps: LR grid x 2 seeds, every method",
                                {"text": plan}, [0, 1])}


PRESETS.update(_long_presets())


def where_tasks_are(tasks: list[str]) -> str:
    """Which presets run each of `tasks`; for a registered task no preset runs, how to give it one; for
    an unregistered name, the registered tasks."""
    from .tasks import list_tasks

    hints = []
    for task in tasks:
        having = [name for name, preset in PRESETS.items() if task in preset.tasks]
        if having:
            hints.append(f"{task!r} is in --preset {', '.join(having)}")
        elif task in list_tasks():
            hints.append(f"no preset runs {task!r}: give it a TaskPlan in a preset of src/fisherlora/bench/presets.py "
                         "(docs/architecture.md, 'Recipe: add a benchmark task')")
        else:
            hints.append(f"{task!r} is not a registered task ({', '.join(list_tasks())})")
    return "; ".join(hints)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
