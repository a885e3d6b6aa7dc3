"""Benchmark presets: which tasks, methods, seeds and learning rates, and how big each run is.

`quick` is the README's main job (one task, every method, one seed, one LR, minutes on 2 CPU
cores); `full` follows the protocol of DESIGN.md section 5 (LR grid of 3+, 3+ seeds, 3 tasks).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..config import FisherConfig
from .roles import base_method
from .runner import RunSpec, TrainingConfig

BASELINE_METHODS = ["lora", "gaussian", "pissa", "olora", "eva", "corda", "lora_ga", "milora"]
# Methods whose adapter starts at zero (B = 0) take larger learning rates than those that move
# weight into the adapter (PiSSA-like, and every Fisher variant): the grid's third value differs.
ZERO_START_METHODS = ["lora", "gaussian", "eva"]
FISHER_METHODS = ["fisher_svd", "fisher_select", "fisher_eig", "fisher_grad", "fisher_svd@true", "fisher_grad@true"]
ALL_METHODS = BASELINE_METHODS + FISHER_METHODS
# PEFT implements these for nn.Linear only; on the vision task's 1x1 convolutions they run on the
# same layers rewritten as nn.Linear (bench/pointwise.py), the plain names failing as PEFT does.
LINEAR_VIEW_METHODS = [f"{method}+linear" for method in ("pissa", "olora", "eva", "corda", "lora_ga")]


@dataclass
class TaskPlan:
    """One task inside a preset.

    Attributes:
        lrs: the learning-rate grid every method is tried on.
        method_lrs: extra learning rates for some methods (grid extensions where a method's best
            LR sat at an edge), added to `lrs` for that method.
        training: shared training settings.
        options: the task's own config overrides (subset sizes, lengths).
        extra_methods: run on this task after the preset's methods (unless `--methods` is given).
    """

    lrs: list[float]
    training: TrainingConfig
    options: dict[str, Any] = field(default_factory=dict)
    method_lrs: dict[str, list[float]] = field(default_factory=dict)
    extra_methods: list[str] = field(default_factory=list)


@dataclass
class Preset:
    name: str
    description: str
    tasks: dict[str, TaskPlan]
    methods: list[str]
    seeds: list[int]
    # Pinned rather than FisherConfig's defaults: the config is part of every run id, so a change
    # of library default (e.g. the default method, which each run overrides anyway) must not
    # make a resumed benchmark re-run finished runs.
    fisher: FisherConfig = field(default_factory=lambda: FisherConfig(progress=False, method="fisher_select"))

    def specs(self, methods: list[str] | None = None, tasks: list[str] | None = None,
              seeds: list[int] | None = None) -> list[RunSpec]:
        """Every run of the preset (optionally restricted), ordered seed-major so that an
        interrupted benchmark has complete seeds for every method first."""
        chosen_tasks = tasks or list(self.tasks)
        unknown = [task for task in chosen_tasks if task not in self.tasks]
        if unknown:
            raise ValueError(f"preset {self.name!r} has no task {unknown}; it has {list(self.tasks)}")
        specs = []
        for task in chosen_tasks:
            plan = self.tasks[task]
            for seed in seeds or self.seeds:
                for method in methods or [*self.methods, *plan.extra_methods]:
                    grid = sorted(set(plan.lrs) | set(plan.method_lrs.get(method, [])))
                    for lr in grid:
                        specs.append(RunSpec(task=task, method=method, seed=seed, lr=lr, training=plan.training,
                                             fisher=self.fisher, task_options=dict(plan.options), preset=self.name))
        return specs


TEXT_SMALL = {"train_size": 768, "val_size": 200, "test_size": 400, "max_length": 48}
TEXT_FULL = {"train_size": 1200, "val_size": 300, "test_size": 600, "max_length": 48}
# 60 steps at batch 8: an lm run costs ~1.5-2 min on one CPU thread (SmolLM2 forward+backward
# ~1.1 s/step, greedy evaluation of 300 prompts ~20 s), which is what fits 126 runs on 2 cores.
LM_FULL = {"train_size": 480, "val_size": 100, "test_size": 200, "max_length": 48}
VISION_FULL = {"train_size": 1600, "val_size": 400, "test_size": 1000, "image_size": 64}


def _third_lr(zero_start: float, residual: float) -> dict[str, list[float]]:
    """Per-method third grid value: higher for zero-start methods, lower for the others."""
    return {method: [zero_start if base_method(method) in ZERO_START_METHODS else residual]
            for method in ALL_METHODS + LINEAR_VIEW_METHODS}


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
    lm_lrs = _third_lr(3e-2, 1e-3)
    # Seen on seed 0 of that grid: MiLoRA, LoRA-GA, fisher_eig and fisher_grad peaked at its top (1e-2),
    # fisher_select at its bottom (1e-3); each grid is extended by one value on that side.
    for method in ("milora", "lora_ga", "fisher_eig", "fisher_grad", "fisher_grad@true"):
        lm_lrs[method] = lm_lrs[method] + [3e-2]
    lm_lrs["fisher_select"] = lm_lrs["fisher_select"] + [3e-4]
    lm_full = TaskPlan(lrs=[3e-3, 1e-2], training=lm_training, options=LM_FULL, method_lrs=lm_lrs)
    vision_lrs = _third_lr(1e-2, 3e-4)
    # Seen on seeds 0-1: MiLoRA's and fisher_eig's best LR sat at the grid's top (3e-3).
    for method in ("milora", "fisher_eig"):
        vision_lrs[method] = vision_lrs[method] + [1e-2]
    # Seen on all seeds: EVA's and CorDA's best LR on the linear view sat at the grid's bottom.
    vision_lrs["eva+linear"] = vision_lrs["eva+linear"] + [3e-4]
    vision_lrs["corda+linear"] = vision_lrs["corda+linear"] + [1e-4]
    vision_full = TaskPlan(lrs=[1e-3, 3e-3], training=vision_training, options=VISION_FULL, method_lrs=vision_lrs,
                           extra_methods=LINEAR_VIEW_METHODS)
    return {
        "quick": Preset(
            name="quick",
            description="text task on a subset, every method, one seed, one learning rate (minutes on 2 cores)",
            tasks={"text": TaskPlan(lrs=[3e-3], training=text_training, options=TEXT_SMALL)},
            methods=ALL_METHODS,
            seeds=[0],
        ),
        "text": Preset("text", "text task: LR grid x 3 seeds, every method", {"text": text_full}, ALL_METHODS,
                       [0, 1, 2]),
        "lm": Preset("lm", "causal-LM task: LR grid x 3 seeds, every method", {"lm": lm_full}, ALL_METHODS,
                     [0, 1, 2]),
        "vision": Preset("vision", "vision task: LR grid x 3 seeds, every method", {"vision": vision_full},
                         ALL_METHODS, [0, 1, 2]),
        "full": Preset("full", "all three tasks: LR grid x 3 seeds, every method",
                       {"text": text_full, "lm": lm_full, "vision": vision_full}, ALL_METHODS, [0, 1, 2]),
    }


PRESETS: dict[str, Preset] = _presets()


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
