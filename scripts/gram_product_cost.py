"""The weight's Gram matrices of every targeted layer by the triangular and by the full product, side by side.

Usage:

    python scripts/gram_product_cost.py --task lm --batches 16 --batch-size 8

Collects exact statistics for every linear layer (`all-linear`) of the task's model on its calibration
batches, then forms each layer's `M^T (F + delta I) M` (`stats.weight_gram.weight_gram`, in the dtype the
initializers use) both ways, alternating which goes first, and prints the summed medians, their ratio
and the largest relative difference between the two results.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fisherlora as fl
from fisherlora.bench.init_cost import InitCostConfig, _task_data
from fisherlora.bench.tasks import TaskType
from fisherlora.peft import find_target_layers
from fisherlora.stats import weight_gram
from fisherlora.stats.layers import weight_matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", default="lm",
                        help="benchmark task whose model and calibration data are used (lm: SmolLM2-135M), every "
                             "linear layer targeted (all-linear)")
    parser.add_argument("--batches", type=int, default=16, help="calibration batches")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per calibration batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per product and layer (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    config = InitCostConfig(task=args.task, targets="all-linear", calibration_batches=args.batches,
                            batch_size=args.batch_size)
    task, _, targets, calibration = _task_data(config)
    task_type: TaskType = task.task_type
    model = get_peft_model(task.model_factory(0), LoraConfig(
        r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM" if task_type == "causal_lm" else "SEQ_CLS"))
    stats = fl.collect_fisher(model, calibration, fl.FisherConfig(progress=False, num_batches=args.batches))
    totals = {"full": 0.0, "triangular": 0.0}
    worst = 0.0
    layers = find_target_layers(model)
    for target in layers:
        weight = weight_matrix(target.weight_module, target.layer_type).detach()
        layer = stats[target.name]
        tall = weight.shape[0] >= weight.shape[1]
        matrix, factor = (weight, layer.grad_cov) if tall else (weight.T, layer.act_cov)
        dtype = weight_gram.gram_dtype(*matrix.shape)
        times: dict[str, list[float]] = {"full": [], "triangular": []}
        results: dict[str, torch.Tensor] = {}
        for repeat in range(args.repeats):
            for mode in ("full", "triangular") if repeat % 2 == 0 else ("triangular", "full"):
                weight_gram.TRIANGULAR_MIN_RATIO = 10**9 if mode == "full" else 2
                start = time.perf_counter()
                results[mode] = weight_gram.weight_gram(matrix, factor, 1e-3, dtype)
                times[mode].append(time.perf_counter() - start)
        for mode, values in times.items():
            totals[mode] += statistics.median(values)
        difference = (results["triangular"] - results["full"]).norm() / results["full"].norm()
        worst = max(worst, float(difference))
    print(f"{len(layers)} layers of {args.task}: full {totals['full']:.2f} s, triangular {totals['triangular']:.2f} s "
          f"(sums of medians of {args.repeats}); ratio {totals['triangular'] / totals['full']:.2f}; largest relative "
          f"difference {worst:.1e}")


if __name__ == "__main__":
    main()
