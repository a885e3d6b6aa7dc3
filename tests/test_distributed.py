"""Data parallelism on CPU with 2 gloo processes.

- `collect_fisher` under torch.distributed: each rank sees half of the batches, every rank ends with
  the statistics (dense and sketched) and the adapter of one process over all batches.
- `bench.runner.train` under Accelerate: DDP with sharded batches gives identical parameters on
  both ranks, equal to one process over the whole batches; in one process it is the plain loop.
- `bench.runner.run_all` under 2 processes: only rank 0 writes the results file.

The workers are started with `fork` where available (the parent has already imported torch, PEFT
and transformers, so a worker starts in well under a second) and `spawn` elsewhere.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as distributed
import torch.multiprocessing as multiprocessing

import fisherlora as fl
from fisherlora.bench.runner import TrainingConfig, linear_schedule, seed_everything, train
from fisherlora.stats.sketch import LowRankFactor
from models import lm_batches, text_batches, tiny_bert, tiny_gpt2

pytestmark = pytest.mark.skipif(not (distributed.is_available() and distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
STATS_CONFIGS: dict[str, dict[str, Any]] = {
    "dense": {},
    # every factor sketched (hidden 16 > 8), two passes over the data
    "sketched": {"sketch_threshold": 8, "sketch_rank": 6, "layer_groups": 2},
}
TRAINING = TrainingConfig(rank=2, alpha=4, warmup_fraction=0.3, max_grad_norm=1.0)
LR = 1e-2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def set_launch_environment(rank: int, world: int, port: int) -> None:
    """What torchrun / accelerate launch set, and a CPU run with one thread per process."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    # A forked worker inherits the parent's Accelerate singleton (a single-process state): forget it.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def launch(worker: Any, *args: Any, timeout: float = 120.0) -> None:
    """Run `worker(rank, WORLD, port, *args)` in WORLD processes; re-raise a worker's error."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.start_processes(worker, args=(WORLD, free_port(), *args), nprocs=WORLD, join=False,
                                              start_method=method)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} worker processes did not finish within {timeout:.0f} s")


def relative_error(first: torch.Tensor, second: torch.Tensor) -> float:
    reference = second.double().norm()
    return float((first.double() - second.double()).norm() / (reference if reference > 0 else 1.0))


# ---------------------------------------------------------------- statistics and adapters


def stats_batches() -> list[dict[str, torch.Tensor]]:
    return text_batches(count=4, batch_size=4, length=7)


def stats_and_adapter(batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Collect statistics and initialize `fisher_svd` (float64 model) for each config in STATS_CONFIGS."""
    from peft import LoraConfig, get_peft_model

    results: dict[str, Any] = {}
    for label, options in STATS_CONFIGS.items():
        model = get_peft_model(tiny_bert(seed=0).double(),
                               LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])).double()
        config = fl.FisherConfig(method="fisher_svd", progress=False, collect_grad_mean=True, **options)
        stats = fl.collect_fisher(model, batches, config)
        fl.initialize_lora_fisher(model, stats, config)
        factors = {}
        for name, layer in stats.items():
            for side in ("act_cov", "grad_cov", "grad_mean"):
                factor = getattr(layer, side)
                if isinstance(factor, LowRankFactor):
                    factors[f"{name}.{side}.eigenvectors_shape"] = torch.tensor(factor.eigenvectors.shape)
                    factor = factor.dense()
                factors[f"{name}.{side}"] = factor.clone()
            factors[f"{name}.num_tokens"] = torch.tensor(layer.num_tokens)
        adapter = {name: parameter.detach().clone() for name, parameter in model.named_parameters()
                   if "lora_A" in name or "lora_B" in name or name.endswith("base_layer.weight")}
        results[label] = {"stats": factors, "adapter": adapter, "world_size": stats.world_size,
                          "num_batches": stats.num_batches}
    return results


def stats_worker(rank: int, world: int, port: int, directory: str) -> None:
    set_launch_environment(rank, world, port)
    distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batches = stats_batches()
        half = len(batches) // world
        torch.save(stats_and_adapter(batches[rank * half:(rank + 1) * half]), Path(directory) / f"rank{rank}.pt")
    finally:
        distributed.destroy_process_group()


def test_statistics_and_adapters_are_summed_over_ranks(tmp_path: Path):
    single = stats_and_adapter(stats_batches())  # first: a forked worker inherits the imports
    launch(stats_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    worst: dict[str, float] = {}
    for label in STATS_CONFIGS:
        reference = single[label]
        assert reference["world_size"] == 1
        for result in ranks:
            assert result[label]["world_size"] == WORLD and result[label]["num_batches"] == 4
            for kind in ("stats", "adapter"):
                assert result[label][kind].keys() == reference[kind].keys()
                for key, value in result[label][kind].items():
                    # every rank holds exactly the same statistics and adapter ...
                    assert torch.equal(value, ranks[0][label][kind][key]), (label, key)
                    # ... equal to one process over all batches
                    error = relative_error(value, reference[kind][key])
                    worst[f"{label}.{kind}"] = max(worst.get(f"{label}.{kind}", 0.0), error)
                    assert error <= 1e-6, (label, key)
        sketched = [key for key in reference["stats"] if key.endswith("eigenvectors_shape")]
        assert (len(sketched) == 8) == (label == "sketched")  # 4 layers x (A, G), each (16, 6)
        assert all(reference["stats"][key].tolist() == [16, 6] for key in sketched)
    print(f"largest relative error against one process: {worst}")


# ---------------------------------------------------------------- training under Accelerate / DDP


def training_model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gpt2(seed=0), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
    return model.double()


def training_batches() -> list[dict[str, torch.Tensor]]:
    # batches of 5 split 3 + 2 over the ranks, with different numbers of label tokens per shard
    return lm_batches(count=3, batch_size=5, length=8)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()
            if parameter.requires_grad}


def train_worker(rank: int, world: int, port: int, directory: str) -> None:
    set_launch_environment(rank, world, port)  # Accelerate sets up gloo from these, as under torchrun
    ddp = torch.nn.parallel.DistributedDataParallel
    original_forward = ddp.forward
    calls = []

    def counting_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original_forward(self, *args, **kwargs)

    ddp.forward = counting_forward  # type: ignore[method-assign]
    try:
        seed_everything(0)
        model = training_model()
        seed_everything(0)
        losses = train(model, training_batches(), LR, TRAINING)
        torch.save({"parameters": trainable(model), "losses": losses, "ddp_forwards": len(calls),
                    "device": str(next(model.parameters()).device), "training": model.training,
                    "world_size": distributed.get_world_size()}, Path(directory) / f"rank{rank}.pt")
    finally:
        ddp.forward = original_forward  # type: ignore[method-assign]
        if distributed.is_initialized():
            distributed.destroy_process_group()


def test_training_runs_data_parallel_under_accelerate(tmp_path: Path):
    seed_everything(0)
    model = training_model()
    initial = trainable(model)
    seed_everything(0)
    single_losses = train(model, training_batches(), LR, TRAINING)
    single = trainable(model)
    launch(train_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    steps = len(training_batches())
    for result in ranks:
        assert result["world_size"] == WORLD
        assert result["ddp_forwards"] == steps, "every step's forward went through DistributedDataParallel"
        assert result["device"] == "cpu" and result["training"] is False
        assert result["losses"] == ranks[0]["losses"], "the logged loss is the whole batch's on every rank"
        assert result["losses"] == pytest.approx(single_losses, rel=1e-5)
        for name, value in result["parameters"].items():
            assert torch.equal(value, ranks[0]["parameters"][name]), name  # gradients were synchronized
            moved = (single[name] - initial[name]).norm()
            assert moved > 0, name
            # sharded batches + DDP = one process over the whole batches (the loss is float32 in HF)
            assert (value - single[name]).norm() <= 1e-3 * moved, name


def reference_train(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], lr: float,
                    config: TrainingConfig) -> list[float]:
    """The training loop before Accelerate: what `train` must still do in one process."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)
    scheduler = linear_schedule(optimizer, len(batches), config.warmup_fraction)
    model.train()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def test_single_process_training_is_the_plain_loop():
    from peft import LoraConfig, get_peft_model

    results = []
    for loop in (reference_train, train):
        seed_everything(0)
        model = get_peft_model(tiny_bert(seed=0), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                             modules_to_save=["classifier"]))
        seed_everything(0)  # dropout is on: the random streams must match too
        losses = loop(model, text_batches(count=3, batch_size=4), LR, TRAINING)
        results.append((losses, trainable(model), model.training))
    (reference_losses, reference, _), (losses, parameters, training) = results
    assert losses == reference_losses and not training
    assert all(torch.equal(parameters[name], reference[name]) for name in reference)


# ---------------------------------------------------------------- the benchmark loop


def run_all_worker(rank: int, world: int, port: int, directory: str) -> None:
    set_launch_environment(rank, world, port)
    from bench.test_runner import CountingFactory, specs
    from fisherlora.bench.results import ResultsFile
    from fisherlora.bench.runner import run_all

    try:
        plan = specs(["fisher_svd"], [1e-3])
        first = run_all(plan, ResultsFile(Path(directory) / "results"), CountingFactory(), show_progress=False)
        again = run_all(plan, ResultsFile(Path(directory) / "results"), CountingFactory(), show_progress=False)
        (Path(directory) / f"rank{rank}.json").write_text(json.dumps({"first": first, "again": again}, default=str))
    finally:
        if distributed.is_initialized():
            distributed.destroy_process_group()


def test_run_all_under_two_processes_writes_once(tmp_path: Path):
    launch(run_all_worker, str(tmp_path))
    lines = (tmp_path / "results" / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 1, "only rank 0 writes"
    (record,) = [json.loads(line) for line in lines]
    assert "error" not in record, record.get("traceback")
    assert record["world_size"] == WORLD and record["train_steps"] == 4
    returned = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    for result in returned:
        assert result["again"] == [], "the second call skips the finished run on every rank"
        (mine,) = result["first"]
        for key in ("val_metric", "test_metric", "final_train_loss", "run_id"):
            assert mine[key] == record[key], key
