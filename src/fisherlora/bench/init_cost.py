"""`fisherlora bench-init`: the cost of each initialization on the same calibration batches.

Measures, in one run and round-robin over repeats (so machine noise hits every method alike),
the wall time and peak resident memory of building the initialized LoRA model for each method,
and prints medians plus ratios against PEFT's LoRA-GA and against one epoch of the benchmark's
training on the same task.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import FisherConfig
from ..files import atomic_write_text
from ..terminal import log_line, progress_bars_wanted
from .baselines import AdapterSpec, build_model, fisher_statistics_mb
from .cost import measure
from .provenance import git_state, machine, versions
from .results import clean_for_json

if TYPE_CHECKING:
    from .tasks import Task

DEFAULT_METHODS = ["pissa", "eva", "corda", "lora_ga", "fisher_svd", "fisher_select", "fisher_eig", "fisher_grad"]


@dataclass
class InitCostConfig:
    """Attributes:
        task: benchmark task whose model and data are used ("text" or "lm").
        methods: methods to time (a `name@true` suffix selects the true Fisher).
        calibration_batches, batch_size: the calibration data every method sees.
        repeats: timed repetitions per method (median reported).
        reference_epoch: also time one training epoch of the task's benchmark preset (same run).
        task_options: overrides of the task's config.
        fisher: settings of our methods.
        sketch_rank, sketch_threshold: a method named `NAME+sketch` runs `NAME` with factors
            larger than `sketch_threshold` kept as rank-`sketch_rank` Nystrom sketches.
    """

    task: str = "text"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    calibration_batches: int = 32
    batch_size: int = 16
    repeats: int = 3
    reference_epoch: bool = True
    task_options: dict[str, Any] = field(default_factory=dict)
    fisher: FisherConfig = field(default_factory=lambda: FisherConfig(progress=False))
    sketch_rank: int = 64
    sketch_threshold: int = 256


def _fisher_for(method: str, config: InitCostConfig) -> tuple[str, FisherConfig]:
    if method.endswith("+sketch"):
        return method[: -len("+sketch")], replace(config.fisher, progress=False, sketch_rank=config.sketch_rank,
                                                 sketch_threshold=config.sketch_threshold)
    return method, replace(config.fisher, progress=False)


def _time_method(task: Task, method: str, calibration: list[Any], config: InitCostConfig) -> dict[str, float]:
    base = task.model_factory(0)
    spec = AdapterSpec(target_modules=task.target_modules, modules_to_save=task.modules_to_save,
                       causal_lm=task.task_type == "causal_lm")
    name, fisher = _fisher_for(method, config)
    gc.collect()
    with measure() as cost:
        model = build_model(name, base, spec, calibration, fisher)
    statistics_mb = _statistics_mb(model, name, fisher)
    del model, base
    gc.collect()
    return {"seconds": cost.seconds, "peak_rss_mb": cost.peak_rss_mb, "extra_rss_mb": cost.extra_rss_mb,
            "statistics_mb": statistics_mb}


def _statistics_mb(model: Any, method: str, fisher: FisherConfig) -> float:
    """MiB held by the data statistics: ours (see `fisher_statistics_mb`), the accumulated weight
    gradient for LoRA-GA, NaN for the others."""
    from ..peft import find_target_layers
    from ..stats.layers import weight_matrix

    if method == "lora_ga":
        return sum(4 * weight_matrix(t.weight_module, t.layer_type).numel() for t in find_target_layers(model)) / 2**20
    ours = fisher_statistics_mb(model, method, fisher)
    return float("nan") if ours is None else ours


def _time_epoch(task: Any, preset_task: str) -> float:
    from .presets import get_preset
    from .runner import RunSpec, train, training_batches

    plan = get_preset(preset_task).tasks[preset_task]
    spec = RunSpec(task=preset_task, method="lora", seed=0, lr=plan.lrs[0], training=plan.training)
    batches = training_batches(task, spec)
    model = build_model("lora", task.model_factory(0), AdapterSpec(target_modules=task.target_modules,
                                                                  modules_to_save=task.modules_to_save), [])
    start = time.perf_counter()
    train(model, batches, spec.lr, plan.training)
    return time.perf_counter() - start


def run_init_cost(config: InitCostConfig, out: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Time every method; return (and write to `out/init_cost_<task>.json`) medians and ratios."""
    from tqdm.auto import tqdm

    from .presets import get_preset
    from .tasks import build_task

    options = dict(config.task_options) or dict(get_preset(config.task).tasks[config.task].options)
    task = build_task(config.task, **options)
    calibration = task.calibration_loader(config.calibration_batches, config.batch_size, 0)
    samples: dict[str, list[dict[str, float]]] = {method: [] for method in config.methods}
    _time_method(task, "lora", calibration[:1], config)  # warm-up: first-call allocations and imports
    bars = progress_bars_wanted(True)
    total = config.repeats * len(config.methods)
    with tqdm(total=total, desc="init cost", unit="init", disable=not bars) as bar:
        for repeat in range(config.repeats):
            for index, method in enumerate(config.methods):
                samples[method].append(_time_method(task, method, calibration, config))
                bar.update(1)
                if not bars:  # a log file: one line per timed initialization
                    log_line(f"init cost {repeat * len(config.methods) + index + 1}/{total}: {method} "
                             f"{samples[method][-1]['seconds']:.2f} s")
    epoch_seconds = _time_epoch(task, config.task) if config.reference_epoch else None
    medians = {
        method: {key: statistics.median(sample[key] for sample in runs) for key in runs[0]}
        for method, runs in samples.items()
    }
    reference = medians.get("lora_ga", {}).get("seconds")
    for values in medians.values():
        values["ratio_to_lora_ga"] = values["seconds"] / reference if reference else float("nan")
        values["ratio_to_epoch"] = values["seconds"] / epoch_seconds if epoch_seconds else float("nan")
    result = {
        "task": config.task,
        "calibration_batches": config.calibration_batches,
        "batch_size": config.batch_size,
        "repeats": config.repeats,
        "epoch_seconds": epoch_seconds,
        "medians": medians,
        "samples": samples,
        "task_options": options,
        "sketch": {"rank": config.sketch_rank, "threshold": config.sketch_threshold},
        **git_state(),
        "versions": versions(),
        "machine": machine(),
    }
    if out is not None:
        directory = Path(out)
        atomic_write_text(directory / f"init_cost_{config.task}.json", json.dumps(clean_for_json(result), indent=2))
        atomic_write_text(directory / f"init_cost_{config.task}.md", format_init_cost(result) + "\n")
    return result


def _mb(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"


def format_init_cost(result: dict[str, Any]) -> str:
    epoch = result["epoch_seconds"]
    lines = [
        f"### initialization cost: task `{result['task']}`, {result['calibration_batches']} calibration batches "
        f"x {result['batch_size']}, median of {result['repeats']} (round-robin); one training epoch of the "
        f"benchmark: {'not measured' if epoch is None else f'{epoch:.1f} s'}",
        "",
        "| method | wall s (median) | x LoRA-GA | x one epoch | peak RSS MB | statistics MB |",
        "|---|---|---|---|---|---|",
    ]
    for method, values in result["medians"].items():
        statistics_mb = _mb(values.get("statistics_mb"))
        lines.append(f"| {method} | {values['seconds']:.2f} | {values['ratio_to_lora_ga']:.2f} | "
                     f"{values['ratio_to_epoch']:.3f} | {values['peak_rss_mb']:.0f} | {statistics_mb} |")
    return "\n".join(lines)
