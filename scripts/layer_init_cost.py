"""Time and transient memory of one layer's initialization from synthetic dense statistics.

Usage (one measurement per process, so that the peak belongs to it):

    python scripts/layer_init_cost.py --method fisher_svd --d-out 11008 --d-in 4096 --rows 512 --rank 16
    python scripts/layer_init_cost.py ... --full-gram   # the weight's Gram matrix by the full product

Prints the wall seconds of `compute_factors`, the process's peak RSS before and after it
(`getrusage`), and with `--save PATH` writes `s B A` for comparing two runs.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import fisherlora as fl
from fisherlora.init.registry import compute_factors
from fisherlora.stats import weight_gram
from fisherlora.stats.container import LayerStats, weight_fingerprint


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--method", default="fisher_svd", help="initializer (a registered name)")
    parser.add_argument("--d-out", type=int, default=11008,
                        help="the weight's output size (default: a Llama-2-7B gate layer: ~1 min, ~2.5 GiB)")
    parser.add_argument("--d-in", type=int, default=4096, help="the weight's input size")
    parser.add_argument("--rows", type=int, default=512, help="synthetic rows behind A and G")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--full-gram", action="store_true", help="never the triangular Gram product")
    parser.add_argument("--save", default=None, help="write s B A (float64) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.full_gram:
        weight_gram.TRIANGULAR_MIN_RATIO = 10**9
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(args.d_out, args.d_in, generator=generator) * 0.02
    inputs = torch.randn(args.rows, args.d_in, generator=generator)
    gradients = torch.randn(args.rows, args.d_out, generator=generator)
    stats = LayerStats(act_cov=inputs.T @ inputs / args.rows, grad_cov=gradients.T @ gradients / args.rows,
                       grad_mean=None, num_tokens=args.rows, num_examples=args.rows, layer_type="linear",
                       weight_shape=(args.d_out, args.d_in), fingerprint=weight_fingerprint(weight))
    del inputs, gradients
    before = peak_gib()
    start = time.perf_counter()
    factors = compute_factors(args.method, weight, stats, args.rank, 2.0, fl.FisherConfig(method=args.method))
    seconds = time.perf_counter() - start
    after = peak_gib()
    print(f"{args.method} {args.d_out} x {args.d_in}, {'full' if args.full_gram else 'default'} Gram product: "
          f"{seconds:.1f} s; peak RSS {before:.2f} GiB before, {after:.2f} GiB after (+{after - before:.2f})")
    if args.save:
        torch.save(factors.product(), args.save)


if __name__ == "__main__":
    main()
