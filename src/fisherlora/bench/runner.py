"""Run the benchmark: for each (task, seed, method, learning rate) build the adapted model,
train it, evaluate it on validation and test, and append one JSON line. Runs already in the
results file are skipped, so an interrupted benchmark resumes where it stopped."""

from __future__ import annotations

import gc
import hashlib
import json
import math
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import FisherConfig, identity_fields
from ..terminal import progress_bars_wanted
from .baselines import AdapterSpec, build_model, fisher_statistics_mb, method_identity
from .cost import measure
from .formatting import progress_note
from .predictions import PredictionRecorder
from .processes import process_rank, use_cpu
from .provenance import git_state, machine, versions
from .results import ResultsFile, RunClaims
from .selection import Stage

if TYPE_CHECKING:
    from .tasks import Task


@dataclass
class TrainingConfig:
    """Shared by every method of a task.

    Attributes:
        rank, alpha: LoRA rank and alpha.
        batch_size: training batch size.
        epochs: passes over the training subset.
        max_steps: cap on optimizer steps (None: no cap).
        calibration_batches: batches every data-aware method sees (the same ones).
        calibration_batch_size: size of those batches.
        warmup_fraction: linear warmup, then linear decay to zero.
        weight_decay, max_grad_norm: AdamW weight decay and gradient clipping.
        curve_points: number of points kept of the smoothed training-loss curve.
    """

    rank: int = 8
    alpha: int = 16
    batch_size: int = 16
    epochs: int = 1
    max_steps: int | None = None
    calibration_batches: int = 16
    calibration_batch_size: int = 16
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    curve_points: int = 50


@dataclass
class RunSpec:
    """One run. `task_options` are the task's own settings (subset sizes, lengths); `stage` is
    recorded but not part of the run id (stage-2 runs differ from stage-1 runs by seed and test set)."""

    task: str
    method: str
    seed: int
    lr: float
    training: TrainingConfig = field(default_factory=TrainingConfig)
    fisher: FisherConfig = field(default_factory=lambda: FisherConfig(progress=False))
    task_options: dict[str, Any] = field(default_factory=dict)
    preset: str = "custom"
    stage: Stage = "tune"

    def config_dict(self) -> dict[str, Any]:
        """Every setting, as recorded with the run (provenance; the run id hashes `identity`)."""
        return {"training": asdict(self.training), "fisher": self.fisher.to_dict(), "task_options": self.task_options}

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same: the training settings and task options, and only the
        `FisherConfig` fields the method's catalogue entry declares it reads (`MethodEntry.reads`).
        Fields that cannot change a result, or hold their declared neutral value, are left out
        (`config.identity_fields`), so adding a config field never changes an existing run id.

        Raises:
            ValueError: an unknown method name (before any run starts).
        """
        return {"training": identity_fields(self.training), "task_options": self.task_options,
                "method_settings": method_identity(self.method, self.fisher)}

    def run_id(self) -> str:
        """Identifies the run: same id means same task, method, seed, LR and settings."""
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:10]
        return f"{self.task}|{self.method}|seed={self.seed}|lr={self.lr:g}|{digest}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def smoothed_curve(losses: Sequence[float], points: int) -> tuple[list[int], list[float]]:
    """Mean loss over consecutive windows: `points` values at the window ends (1-based steps)."""
    if not losses:
        return [], []
    window = max(1, math.ceil(len(losses) / points))
    steps, values = [], []
    for start in range(0, len(losses), window):
        chunk = losses[start:start + window]
        steps.append(start + len(chunk))
        values.append(float(sum(chunk) / len(chunk)))
    return steps, values


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _loss_units(batch: Any) -> int:
    from ..stats.objective import default_loss_units

    try:
        return default_loss_units(batch)
    except ValueError:
        values = batch.values() if isinstance(batch, dict) else batch
        return next(int(value.shape[0]) for value in values if isinstance(value, torch.Tensor) and value.dim() > 0)


def _shard(batch: dict[str, Any], index: int, count: int) -> dict[str, Any]:
    """Rows `index` of `count` nearly equal parts of every tensor of the batch (split on dim 0)."""
    sizes = {int(value.shape[0]) for value in batch.values() if isinstance(value, torch.Tensor) and value.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"cannot shard a batch whose tensors have different first dimensions {sorted(sizes)}")
    (size,) = sizes
    if size < count:
        raise ValueError(f"a training batch of {size} examples cannot be split over {count} processes; "
                         "use a batch size of at least the number of processes")
    return {key: torch.tensor_split(value, count)[index] if isinstance(value, torch.Tensor) and value.dim() > 0
            else value for key, value in batch.items()}


def train(model: nn.Module, batches: Sequence[Any], lr: float, config: TrainingConfig,
          progress: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW over the trainable parameters, one step per batch; returns the per-step losses.

    Runs under `accelerate.Accelerator`. In a single process this is the plain loop: the model stays
    on its device and is not wrapped. Launched with several processes (`accelerate launch`,
    `torchrun`), the model is wrapped in DistributedDataParallel on `accelerator.device` and every
    batch is *sharded*: each rank runs rows `rank` of `world size` near-equal parts of the same batch,
    its loss weighted by its share of the batch's loss units (labels != -100 after the causal shift,
    else examples), so the DDP-averaged gradient is the whole batch's. The steps, batches, schedule
    and clipping are those of one process; the returned losses are the whole batch's, the same on
    every rank. Afterwards the model is unwrapped and back on its original device.

    Raises:
        FloatingPointError: the loss became non-finite (the run is recorded as failed; under DDP
            every rank raises at the same step).
    """
    from accelerate import Accelerator
    from accelerate.utils import send_to_device

    accelerator = Accelerator(cpu=use_cpu())
    world, rank = accelerator.num_processes, accelerator.process_index
    distributed = world > 1
    home = next(model.parameters()).device
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)
    # Only under DDP is the model moved (to this rank's device). The scheduler is not prepared:
    # Accelerate would step it once per process, and sharding keeps the single-process step count.
    wrapped = accelerator.prepare_model(model, device_placement=distributed)
    prepared_optimizer = accelerator.prepare_optimizer(optimizer, device_placement=distributed)
    scheduler = linear_schedule(optimizer, len(batches), config.warmup_fraction)
    if distributed:
        # Same seed on every rank (seed_everything): offset it so the shards get independent dropout
        # masks, as the rows of one batch do in a single process.
        torch.manual_seed(int(torch.randint(2**62, ())) + rank)
    wrapped.train()
    losses = []
    try:
        for step, batch in enumerate(batches):
            if not distributed:
                loss = wrapped(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {float(loss)} at step {step}")
                accelerator.backward(loss)
                value = float(loss.detach())
            else:
                shard = _shard(batch, rank, world)
                share = _loss_units(shard) / max(_loss_units(batch), 1)
                outputs = wrapped(**send_to_device(shard, accelerator.device))
                # A shard without loss units contributes a zero that still goes through DDP.
                loss = outputs.loss if share > 0 else outputs.logits.sum() * 0.0
                whole = accelerator.reduce(loss.detach().float() * share, reduction="sum")  # the batch's loss
                if not torch.isfinite(whole):
                    raise FloatingPointError(f"training loss became {float(whole)} at step {step}")
                accelerator.backward(loss * (share * world))  # DDP averages: sum_r share_r * grad_r
                value = float(whole)
            accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
            prepared_optimizer.step()
            scheduler.step()
            prepared_optimizer.zero_grad(set_to_none=True)
            losses.append(value)
            if progress is not None:
                progress(step, losses[-1])
    finally:
        model.eval()
        del wrapped, prepared_optimizer  # the DDP wrapper goes with the accelerator (no gc pass here: execute runs one)
        if distributed:
            model.to(home)
    return losses


def training_batches(task: Any, spec: RunSpec) -> list[Any]:
    """The training batches in the seed's order: identical for every method at this seed."""
    batches = []
    for epoch in range(spec.training.epochs):
        batches.extend(task.train_loader(spec.training.batch_size, spec.seed * 1000 + epoch))
    if spec.training.max_steps is not None:
        batches = batches[: spec.training.max_steps]
    return batches


def execute(spec: RunSpec, task: Task, show_progress: bool = True) -> dict[str, Any]:
    """Build, train and evaluate one run; return its JSON record (failures are recorded too)."""
    from tqdm.auto import tqdm

    record: dict[str, Any] = {
        "run_id": spec.run_id(),
        "preset": spec.preset,
        "stage": spec.stage,
        "task": spec.task,
        "method": spec.method,
        "seed": spec.seed,
        "lr": spec.lr,
        "metric_name": task.metric_name,
        "val_metric": float("nan"),
        "test_metric": float("nan"),
        "config": spec.config_dict(),
        **git_state(),
        "versions": versions(),
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        seed_everything(spec.seed)
        base = task.model_factory(spec.seed)
        adapter = AdapterSpec(rank=spec.training.rank, alpha=spec.training.alpha,
                              target_modules=task.target_modules, modules_to_save=task.modules_to_save,
                              causal_lm=task.task_type == "causal_lm")
        calibration = list(task.calibration_loader(spec.training.calibration_batches,
                                                   spec.training.calibration_batch_size, spec.seed))
        seed_everything(spec.seed)
        with measure() as init_cost:
            model = build_model(spec.method, base, adapter, calibration, spec.fisher)
        statistics_mb = fisher_statistics_mb(model, spec.method, spec.fisher) or 0.0
        record.update(init_seconds=init_cost.seconds, init_peak_rss_mb=init_cost.peak_rss_mb,
                      init_extra_rss_mb=init_cost.extra_rss_mb, init_stats_mb=statistics_mb)
        batches = training_batches(task, spec)
        seed_everything(spec.seed)
        bar = tqdm(total=len(batches), desc=f"{spec.task} {spec.method} lr={spec.lr:g} s{spec.seed}",
                   unit="step", leave=False, disable=not progress_bars_wanted(show_progress))

        def progress(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        start = time.perf_counter()
        try:
            losses = train(model, batches, spec.lr, spec.training, progress)
        finally:
            bar.close()
        record["train_seconds"] = time.perf_counter() - start
        steps, values = smoothed_curve(losses, spec.training.curve_points)
        record["curve"] = {"step": steps, "train_loss": values}
        record["final_train_loss"] = values[-1] if values else float("nan")
        record["train_steps"] = len(losses)
        record["val_metric"] = float(task.evaluate(model, task.val_loader()))
        with PredictionRecorder(model) as predictions:  # for the collapsed-run count (all one class)
            record["test_metric"] = float(task.evaluate(model, task.test_loader()))
        record.update(predictions.fields())
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # a failed run is a result: recorded, reported, not hidden
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc(limit=6)
    finally:
        gc.collect()
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return record


def run_all(specs: Sequence[RunSpec], results: ResultsFile, task_factory: Callable[[RunSpec], Any],
            show_progress: bool = True) -> list[dict[str, Any]]:
    """Execute every spec not yet in `results`, appending each record as soon as it is done. Several
    processes started on the same specs and folder split them: each skips a run another one has
    claimed (`results.RunClaims`), so they finish together instead of repeating runs.

    Under a distributed launch every rank runs every pending spec (training is data-parallel, see
    `train`); the list of finished runs is rank 0's, only rank 0 writes records (with `world_size`
    added) and shows progress, and all ranks return after the last record is written.

    Returns:
        the records of this call (written by rank 0; the same records on every rank).
    """
    from tqdm.auto import tqdm

    rank, world = process_rank()
    claims = RunClaims(results.directory)
    done = results.done_ids() if rank == 0 else set()
    if world > 1:
        import torch.distributed as distributed

        shared: list[Any] = [done]
        distributed.broadcast_object_list(shared, src=0)
        done = shared[0]
    pending = [spec for spec in specs if spec.run_id() not in done]
    planned, start = {spec.run_id() for spec in specs}, time.perf_counter()
    written: list[dict[str, Any]] = []
    skipped: list[RunSpec] = []
    with tqdm(total=len(specs), initial=len(specs) - len(pending), desc="runs", unit="run",
              disable=not progress_bars_wanted(show_progress) or rank != 0) as bar:

        def run_one(spec: RunSpec) -> None:
            if world == 1 and not claims.claim(spec.run_id()):
                skipped.append(spec)  # another process sharing the results folder is running it now
                return
            try:
                if world == 1 and spec.run_id() in results.done_ids():
                    # Another process sharing the results folder finished it meanwhile (checked under the claim).
                    bar.update(1)
                    return
                record = execute(spec, task_factory(spec), show_progress and rank == 0)
                if world > 1:
                    record["world_size"] = world
                if rank == 0:
                    results.append(record)
            finally:  # after the record is written: no moment where the run is neither claimed nor done
                if world == 1:
                    claims.release(spec.run_id())
            written.append(record)
            bar.update(1)
            status = record.get("error") or (f"val={record['val_metric']:.4f} test={record['test_metric']:.4f} "
                                             f"(init {record['init_seconds']:.1f} s, "
                                             f"train {record['train_seconds']:.1f} s)")
            if rank == 0:
                left = planned - results.done_ids()
                note = progress_note(len(planned) - len(left), len(planned), claims.held_elsewhere(left) if world == 1
                                     else 0, (time.perf_counter() - start) / len(written))
                bar.write(f"{spec.task:>7} {spec.method:<18} seed={spec.seed} lr={spec.lr:g}: {status} {note}")
                sys.stdout.flush()  # a log file sees each run as it finishes

        for spec in pending:
            run_one(spec)
        # A run skipped for another process's claim is free again if that process died meanwhile.
        elsewhere, skipped = skipped, []
        for spec in elsewhere:
            run_one(spec)
        still = {spec.run_id() for spec in skipped} - results.done_ids()
        if still and rank == 0:
            bar.write(f"{len(still)} run(s) still running in other processes sharing {results.directory}: this "
                      "process's summary lacks them (the last process to finish has them all)")
            sys.stdout.flush()
    if world > 1:
        import torch.distributed as distributed

        distributed.barrier()  # the results file is complete before any rank reads it again
    return written
