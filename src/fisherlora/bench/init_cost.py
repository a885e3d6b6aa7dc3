"""`fisherlora bench-init`: the cost of each initialization on the same calibration batches.

Measures, in one run and round-robin over repeats (so machine noise hits every method alike),
the wall time, CPU time and peak resident memory of building the initialized LoRA model for each
method, and where the time goes (`fisherlora.phases`: forward, backward, statistics,
factorization, write; the rest is "other": building the PEFT model, moving batches, the loss).
Besides the methods it times the forward+backward floor (`floor.py`: one forward and one backward
pass over the same batches, no weight gradient). It prints medians plus ratios against PEFT's
LoRA-GA, against the floor and against one epoch of the benchmark's training on the same task, and
beside them the same ratios by arithmetic alone: the multiply-adds of the targeted layers' products
(`work_count.py`), counted on the same batches (`work_probe.py`).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import FisherConfig
from ..files import atomic_write_text
from ..phases import PHASES, record_phases
from ..terminal import log_line, progress_bars_wanted
from .baselines import AdapterSpec, build_model, effective_config, fisher_statistics_mb
from .cost import measure
from .floor import forward_backward_floor
from .provenance import git_state, machine, versions
from .results import clean_for_json
from .work_count import StatisticsWork, WorkCount, count_work
from .work_probe import probe_rows

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


def statistics_work(method: str, config: InitCostConfig) -> StatisticsWork | None:
    """What `method`'s statistics collect (its own sketch, `M`, label draws), or None for a method
    without Fisher statistics (PEFT's, weight-only ones, the floor)."""
    if method == FLOOR:
        return None
    name, fisher = _fisher_for(method, config)
    entry, effective = effective_config(name, fisher)
    needed = entry.statistics_needed(effective) if entry.function is not None else ()
    if not needed:
        return None
    with_grad_mean = effective.collect_grad_mean
    if with_grad_mean is None:  # as `collect_fisher` decides
        with_grad_mean = "grad_mean" in needed
    return StatisticsWork(with_grad_mean, effective.sketch_threshold, effective.sketch_rank,
                          effective.n_samples if effective.fisher == "true" else 1)


def work_per_token(task: Task, targets: list[str] | str, calibration: list[Any], entries: list[str],
                   config: InitCostConfig) -> dict[str, Any] | None:
    """The multiply-adds per token of the targeted layers (`work_count.count_work`, rows counted by
    `work_probe.probe_rows` on the calibration batches) for the floor, LoRA-GA and each of our
    methods, with the ratios; None when no entry is one of them (nothing is probed)."""
    from ..peft import find_target_layers

    settings = {method: statistics_work(method, config) for method in entries}
    counted = [method for method in entries if method in (FLOOR, "lora_ga") or settings[method] is not None]
    if not counted:
        return None
    model = task.model_factory(0)
    probed = probe_rows(model, find_target_layers(model, target_modules=targets), calibration)
    del model
    base = count_work(probed.layers, StatisticsWork())
    methods: dict[str, dict[str, Any]] = {}
    for method in counted:
        work = settings[method]
        count: WorkCount | None = None if work is None else count_work(probed.layers, work)
        total = count.statistics if count is not None else base.floor if method == FLOOR else base.lora_ga
        methods[method] = {"multiply_adds": total, "arithmetic_to_lora_ga": total / base.lora_ga,
                           "arithmetic_to_floor": total / base.floor}
        if count is not None and work is not None:
            methods[method].update(factors=count.factors, grad_mean=count.grad_mean, **asdict(work))
    return {"tokens": probed.tokens, "forward": base.forward, "floor": base.floor, "lora_ga": base.lora_ga,
            "untargeted_forward": probed.untargeted_forward / probed.tokens, "methods": methods,
            "layers": [asdict(layer) for layer in probed.layers]}


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


def _task_data(config: InitCostConfig) -> tuple[Task, dict[str, Any], list[str] | str, list[Any]]:
    """The task, its options, the resolved targets and the calibration batches every method sees."""
    from .presets import get_preset
    from .tasks import build_task

    options = dict(config.task_options) or dict(get_preset(config.task).tasks[config.task].options)
    task = build_task(config.task, **options)
    targets = resolve_targets(task, config.targets)
    return task, options, targets, task.calibration_loader(config.calibration_batches, config.batch_size, 0)


def _entries(config: InitCostConfig) -> list[str]:
    return [*config.methods, *([FLOOR] if config.floor else [])]


def count_init_work(config: InitCostConfig) -> dict[str, Any]:
    """`work_per_token` of the configured run, with nothing timed (`bench-init --count-only`).

    Raises:
        ValueError: no entry is counted (the floor, LoRA-GA or a method with Fisher statistics).
    """
    task, _, targets, calibration = _task_data(config)
    work = work_per_token(task, targets, calibration, _entries(config), config)
    if work is None:
        raise ValueError(f"none of {_entries(config)} is counted: only the floor, lora_ga and methods with "
                         "Fisher statistics are")
    return work


def format_work_per_token(work: dict[str, Any], requested: list[str] | None = None) -> str:
    """The markdown table of `work_per_token` (millions of multiply-adds per token) and its legend, and
    which of the `requested` methods it does not count."""
    lines = ["| method | multiply-adds per token (M) | factor sums (M) | mean gradient (M) | arith. x LoRA-GA "
             "| arith. x floor |", "|---" * 6 + "|"]
    for method, entry in work["methods"].items():
        cells = [method, *(_number(entry[key] / 1e6, 3) if key in entry else "-"
                           for key in ("multiply_adds", "factors", "grad_mean")),
                 _number(entry["arithmetic_to_lora_ga"]), _number(entry["arithmetic_to_floor"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", _work_legend(work), *_uncounted(work, requested)])


def _uncounted(work: dict[str, Any], requested: list[str] | None) -> list[str]:
    """A line naming the requested methods the count leaves out (PEFT's other initializers: their
    passes are not this project's statistics), so that none disappears without a word."""
    left_out = [method for method in requested or [] if method not in work["methods"]]
    return ["", f"Not counted: {', '.join(left_out)} (only the floor, lora_ga and the methods with Fisher "
                "statistics are)."] if left_out else []


def run_init_cost(config: InitCostConfig, out: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Time every method (and the floor); return (and write to `out/init_cost_<task>.json` and
    `.md`) medians and ratios."""
    from tqdm.auto import tqdm

    task, options, targets, calibration = _task_data(config)
    entries = _entries(config)
    load_at_start = load_average()
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
    work = work_per_token(task, targets, calibration, entries, config)
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
        "work_per_token": work,
        **git_state(),
        "versions": versions(),
        "machine": machine(),
        "load_average": {"start": load_at_start, "end": load_average()},
    }
    warning = contention_warning(result["load_average"], result["machine"]["torch_threads"])
    if warning:
        log_line(warning)
    if out is not None:
        directory = Path(out)
        atomic_write_text(directory / f"init_cost_{config.task}.json", json.dumps(clean_for_json(result), indent=2))
        atomic_write_text(directory / f"init_cost_{config.task}.md", format_init_cost(result) + "\n")
    return result


def load_average() -> list[float] | None:
    """The system's 1, 5 and 15 minute load averages (runnable processes), or None where the platform
    has none (`os.getloadavg`)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def contention_warning(load: dict[str, Any], threads: int) -> str | None:
    """A warning when other processes ran during the measurement: a 1-minute load average above 0.5
    before the timing started, or above this process's `threads` + 0.5 at its end. Ratios move under
    contention (measured: the statistics phase slowed more than LoRA-GA's passes, README,
    "Initialization cost"), so such a table is not comparable with one from an idle machine."""
    start, end = load.get("start"), load.get("end")
    busy_before = start is not None and start[0] > 0.5
    busy_during = end is not None and end[0] > threads + 0.5
    if not (busy_before or busy_during):
        return None
    seen = ", ".join(f"{when} {values[0]:.2f} / {values[1]:.2f} (1 / 5 min)" for when, values in
                     (("at the start", start), ("at the end", end)) if values is not None)
    return (f"warning: other processes ran during the measurement (load average {seen}; this process ran "
            f"{threads} thread(s)): the ratios shift under contention and are not comparable with a table "
            "measured on an idle machine")


def _load_label(result: dict[str, Any]) -> str:
    load = result.get("load_average") or {}
    parts = [f"{when} {values[0]:.2f}" for when, values in (("start", load.get("start")), ("end", load.get("end")))
             if values is not None]
    return f"; 1-minute load average at {', '.join(parts)}" if parts else ""


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _targets_label(targets: Any) -> str:
    return targets if isinstance(targets, str) else ", ".join(targets)


def format_init_cost(result: dict[str, Any]) -> str:
    """The markdown table of a `run_init_cost` result (phase columns: median wall seconds). A result
    with `work_per_token` (written since the arithmetic ratios were added) gets their two columns and
    their legend; an older one is formatted as it was."""
    epoch = result["epoch_seconds"]
    work = result.get("work_per_token")
    bounds = work.get("methods", {}) if isinstance(work, dict) else None
    phases = [key[: -len("_seconds")] for key in next(iter(result["medians"].values())) if key.endswith("_seconds")
              and key not in ("cpu_seconds",)]
    arithmetic = ["arith. x LoRA-GA", "arith. x floor"] if bounds is not None else []
    header = ["method", "wall s", "x LoRA-GA", "x floor", *arithmetic, "CPU s", "x LoRA-GA (CPU)",
              *(f"{phase} s" for phase in phases), "x one epoch", "peak RSS MB", "statistics MB"]
    lines = [
        f"### initialization cost: task `{result['task']}`, targets `{_targets_label(result.get('targets', '-'))}` "
        f"({len(result['target_modules']) if isinstance(result.get('target_modules'), list) else '-'} layers), "
        f"{result['calibration_batches']} calibration batches x {result['batch_size']}, median of "
        f"{result['repeats']} (round-robin); one training epoch of the benchmark: "
        f"{'not measured' if epoch is None else f'{epoch:.1f} s'}{_load_label(result)}",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    for method, values in result["medians"].items():
        bound = bounds.get(method, {}) if bounds is not None else {}
        bound_cells = [_number(bound.get("arithmetic_to_lora_ga")), _number(bound.get("arithmetic_to_floor"))]
        cells = [method, _number(values["seconds"]), _number(values["ratio_to_lora_ga"]),
                 _number(values.get("ratio_to_floor")),
                 *(bound_cells if arithmetic else []),
                 _number(values.get("cpu_seconds")), _number(values.get("cpu_ratio_to_lora_ga")),
                 *(_number(values.get(f"{phase}_seconds")) for phase in phases),
                 _number(values["ratio_to_epoch"], 3), _number(values["peak_rss_mb"], 0),
                 _number(values.get("statistics_mb"))]
        lines.append("| " + " | ".join(cells) + " |")
    if isinstance(work, dict):
        lines += ["", _work_legend(work)]
    return "\n".join(lines)


def _multiply_adds(value: float) -> str:
    return f"{value / 1e6:.3g} M" if value >= 1e5 else f"{value:.3g}"


def _work_legend(work: dict[str, Any]) -> str:
    untargeted = work.get("untargeted_forward")
    rest = "" if untargeted is None else f" (their forward: {_multiply_adds(untargeted)} multiply-adds per token)"
    return (f"arith.: multiply-adds per token in the targeted layers' products (forward F = "
            f"{_multiply_adds(work['forward'])}, floor 2F, LoRA-GA 3F, ours 2F + the K-FAC factor sums [+ the "
            f"mean gradient's weight gradient]) over LoRA-GA's and the floor's. Not counted: attention, "
            f"embeddings, layer norms, the loss and the untargeted linear layers{rest}, which every method pays "
            "alike and which pull measured ratios towards 1, nor how fast each product runs. Above 1 against "
            "LoRA-GA, the statistics do more arithmetic than LoRA-GA whatever the rest costs.")
