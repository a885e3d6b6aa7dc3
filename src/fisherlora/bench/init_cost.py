"""`fisherlora bench-init`: the cost of each initialization on the same calibration batches.

Measures, in one run and round-robin over repeats (so machine noise hits every method alike),
the wall time, CPU time and peak resident memory of building the initialized LoRA model for each
method, and where the time goes (`fisherlora.phases`: forward, backward, statistics,
factorization, write; the rest is "other": building the PEFT model, moving batches, the loss).
Besides the methods it times the forward+backward floor (`floor.py`: one forward and one backward
pass over the same batches, no weight gradient). It prints medians plus ratios against PEFT's
LoRA-GA, against the floor and against one epoch of the benchmark's training on the same task.
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
from ..phases import PHASES, record_phases
from ..terminal import log_line, progress_bars_wanted
from .baselines import AdapterSpec, build_model, fisher_statistics_mb
from .cost import measure
from .floor import forward_backward_floor
from .provenance import git_state, machine, versions
from .results import clean_for_json

if TYPE_CHECKING:
    from .tasks import Task

DEFAULT_METHODS = ["pissa", "eva", "corda", "lora_ga", "fisher_svd", "fisher_select", "fisher_eig", "fisher_grad"]
FLOOR = "floor"  # the forward+backward floor, timed in the same round-robin as the methods
ALL_LINEAR = "all-linear"  # PEFT's spelling: every linear layer except the output layer / classifier head
_PEFT_TASK_TYPES = {"sequence_classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


@dataclass
class InitCostConfig:
    """Attributes:
        task: benchmark task whose model and data are used ("text", "lm" or "vision").
        methods: methods to time (a `name@true` suffix selects the true Fisher).
        calibration_batches, batch_size: the calibration data every method sees.
        repeats: timed repetitions per method (median reported).
        reference_epoch: also time one training epoch of the task's benchmark preset (same run).
        floor: also time the forward+backward floor (`floor.py`) in the round-robin.
        targets: LoRA target modules (names, PEFT's suffix match) or "all-linear"; None: the task's.
        task_options: overrides of the task's config.
        fisher: settings of our methods.
        sketch_rank, sketch_threshold: a method named `NAME+sketch` runs `NAME` with factors
            larger than `sketch_threshold` kept as rank-`sketch_rank` Nystrom sketches.
        command: the command line that started the run (written with the results).
    """

    task: str = "text"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    calibration_batches: int = 32
    batch_size: int = 16
    repeats: int = 3
    reference_epoch: bool = True
    floor: bool = True
    targets: list[str] | str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    fisher: FisherConfig = field(default_factory=lambda: FisherConfig(progress=False))
    sketch_rank: int = 64
    sketch_threshold: int = 256
    command: str | None = None


def _fisher_for(method: str, config: InitCostConfig) -> tuple[str, FisherConfig]:
    if method.endswith("+sketch"):
        return method[: -len("+sketch")], replace(config.fisher, progress=False, sketch_rank=config.sketch_rank,
                                                 sketch_threshold=config.sketch_threshold)
    return method, replace(config.fisher, progress=False)


def resolve_targets(task: Task, targets: list[str] | str | None) -> list[str] | str:
    """The target modules every method gets: the task's, the names given, or for "all-linear" the
    names PEFT's own `all-linear` rule selects on the task's model (every `nn.Linear`/`Conv1D`
    except the output embedding, and for a classifier its head), spelled out so that methods which
    match targets themselves (LoRA-GA, CorDA) see the same layers."""
    if targets is None:
        return task.target_modules
    if targets != ALL_LINEAR and targets != [ALL_LINEAR]:
        return targets
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    config = LoraConfig(target_modules=ALL_LINEAR, task_type=_PEFT_TASK_TYPES.get(task.task_type))
    names = getattr(_maybe_include_all_linear_layers(config, task.model_factory(0)), "target_modules", [])
    names = sorted(set(names) - set(task.modules_to_save or []))
    if not names:
        raise ValueError(f"--targets {ALL_LINEAR}: the {task.name!r} model has no linear layer")
    return names


def _time_method(task: Task, method: str, calibration: list[Any], config: InitCostConfig,
                 targets: list[str] | str | None = None) -> dict[str, float]:
    base = task.model_factory(0)
    spec = AdapterSpec(target_modules=task.target_modules if targets is None else targets,
                       modules_to_save=task.modules_to_save, causal_lm=task.task_type == "causal_lm")
    name, fisher = _fisher_for(method, config)
    gc.collect()
    with measure() as cost, record_phases() as phases:
        if method == FLOOR:
            forward_backward_floor(base, calibration)
            model = None
        else:
            model = build_model(name, base, spec, calibration, fisher)
    statistics_mb = float("nan") if model is None else _statistics_mb(model, name, fisher)
    del model, base
    gc.collect()
    other = cost.seconds - sum(phases.values())
    return {"seconds": cost.seconds, "cpu_seconds": cost.cpu_seconds, "peak_rss_mb": cost.peak_rss_mb,
            "extra_rss_mb": cost.extra_rss_mb, "statistics_mb": statistics_mb,
            **{f"{phase}_seconds": phases[phase] for phase in PHASES}, "other_seconds": other}


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


def _ratio(value: float, reference: float | None) -> float:
    return value / reference if reference else float("nan")


def run_init_cost(config: InitCostConfig, out: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Time every method (and the floor); return (and write to `out/init_cost_<task>.json` and
    `.md`) medians and ratios."""
    from tqdm.auto import tqdm

    from .presets import get_preset
    from .tasks import build_task

    options = dict(config.task_options) or dict(get_preset(config.task).tasks[config.task].options)
    task = build_task(config.task, **options)
    targets = resolve_targets(task, config.targets)
    calibration = task.calibration_loader(config.calibration_batches, config.batch_size, 0)
    entries = [*config.methods, *([FLOOR] if config.floor else [])]
    samples: dict[str, list[dict[str, float]]] = {method: [] for method in entries}
    _time_method(task, "lora", calibration[:1], config, targets)  # warm-up: first-call allocations and imports
    bars = progress_bars_wanted(True)
    total = config.repeats * len(entries)
    with tqdm(total=total, desc="init cost", unit="init", disable=not bars) as bar:
        for repeat in range(config.repeats):
            # Alternate the order as well: no method always runs right after the same one.
            order = entries if repeat % 2 == 0 else entries[::-1]
            for index, method in enumerate(order):
                samples[method].append(_time_method(task, method, calibration, config, targets))
                bar.update(1)
                if not bars:  # a log file: one line per timed initialization
                    log_line(f"init cost {repeat * len(entries) + index + 1}/{total}: {method} "
                             f"{samples[method][-1]['seconds']:.2f} s")
    epoch_seconds = _time_epoch(task, config.task) if config.reference_epoch else None
    medians = {
        method: {key: statistics.median(sample[key] for sample in runs) for key in runs[0]}
        for method, runs in samples.items()
    }
    lora_ga = medians.get("lora_ga", {})
    floor = medians.get(FLOOR, {})
    for values in medians.values():
        values["ratio_to_lora_ga"] = _ratio(values["seconds"], lora_ga.get("seconds"))
        values["cpu_ratio_to_lora_ga"] = _ratio(values["cpu_seconds"], lora_ga.get("cpu_seconds"))
        values["ratio_to_floor"] = _ratio(values["seconds"], floor.get("seconds"))
        values["ratio_to_epoch"] = _ratio(values["seconds"], epoch_seconds)
    result = {
        "task": config.task,
        "command": config.command,
        "targets": config.targets if config.targets is not None else task.target_modules,
        "target_modules": targets,
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


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _targets_label(targets: Any) -> str:
    return targets if isinstance(targets, str) else ", ".join(targets)


def format_init_cost(result: dict[str, Any]) -> str:
    """The markdown table of a `run_init_cost` result (phase columns: median wall seconds)."""
    epoch = result["epoch_seconds"]
    phases = [key[: -len("_seconds")] for key in next(iter(result["medians"].values())) if key.endswith("_seconds")
              and key not in ("cpu_seconds",)]
    lines = [
        f"### initialization cost: task `{result['task']}`, targets `{_targets_label(result.get('targets', '-'))}` "
        f"({len(result['target_modules']) if isinstance(result.get('target_modules'), list) else '-'} layers), "
        f"{result['calibration_batches']} calibration batches x {result['batch_size']}, median of "
        f"{result['repeats']} (round-robin); one training epoch of the benchmark: "
        f"{'not measured' if epoch is None else f'{epoch:.1f} s'}",
        "",
        "| method | wall s | x LoRA-GA | x floor | CPU s | x LoRA-GA (CPU) | "
        + " | ".join(f"{phase} s" for phase in phases) + " | x one epoch | peak RSS MB | statistics MB |",
        "|---" * (9 + len(phases)) + "|",
    ]
    for method, values in result["medians"].items():
        cells = [method, _number(values["seconds"]), _number(values["ratio_to_lora_ga"]),
                 _number(values.get("ratio_to_floor")), _number(values.get("cpu_seconds")),
                 _number(values.get("cpu_ratio_to_lora_ga")),
                 *(_number(values.get(f"{phase}_seconds")) for phase in phases),
                 _number(values["ratio_to_epoch"], 3), _number(values["peak_rss_mb"], 0),
                 _number(values.get("statistics_mb"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
