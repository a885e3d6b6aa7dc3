"""Command line: `fisherlora init`, `fisherlora methods` (and the benchmark commands)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .config import EIG_SCALES, FISHER_TYPES, GRAD_SCALES, FisherConfig


def _add_fisher_arguments(parser: argparse.ArgumentParser) -> None:
    from .init.registry import INITIALIZERS

    parser.add_argument("--method", default=FisherConfig.method, choices=sorted(INITIALIZERS))
    parser.add_argument("--fisher", default="empirical", choices=FISHER_TYPES)
    parser.add_argument("--batches", type=int, default=32, help="calibration batches (default 32)")
    parser.add_argument("--samples", type=int, default=1, help="label draws per input for --fisher true")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--grad-scale", default="stable", choices=GRAD_SCALES)
    parser.add_argument("--eig-scale", default="projection", choices=EIG_SCALES)
    parser.add_argument("--no-progress", action="store_true")


def _fisher_config(args: argparse.Namespace) -> FisherConfig:
    return FisherConfig(method=args.method, fisher=args.fisher, num_batches=args.batches, n_samples=args.samples,
                        damping=args.damping, grad_scale=args.grad_scale, eig_scale=args.eig_scale,
                        progress=not args.no_progress)


def _command_methods(args: argparse.Namespace) -> int:
    from .methods import PEFT_BASELINES, list_methods

    for name, description in list_methods().items():
        origin = "peft" if name in PEFT_BASELINES else "ours"
        print(f"{name:<14} [{origin}] {description}")
    return 0


def _command_init(args: argparse.Namespace) -> int:
    from .text_init import TextInitJob, run_text_init

    job = TextInitJob(model=args.model, data=args.data, text_column=args.text_column, label_column=args.label_column,
                      out=args.out, rank=args.rank, alpha=args.alpha if args.alpha is not None else 2 * args.rank,
                      use_rslora=args.rslora, targets=args.targets, batch_size=args.batch_size,
                      max_length=args.max_length, seed=args.seed, fisher=_fisher_config(args))
    summary = run_text_init(job)
    print(f"initialized {len(summary['layers'])} layers with {job.fisher.method} ({job.fisher.fisher} Fisher) "
          f"on {summary['examples']} rows; wrote {job.out}/adapter, residual_model, stats.safetensors, report.json")
    for layer in summary["layers"]:
        energy = layer["captured_energy"]
        print(f"  {layer['name']}: r={layer['rank']} fisher energy={'-' if energy is None else f'{energy:.3f}'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fisherlora", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    methods = commands.add_parser("methods", help="list every initialization with one line each")
    methods.set_defaults(handler=_command_methods)

    init = commands.add_parser("init", help="initialize a LoRA adapter for a sequence-classification model")
    init.add_argument("--model", required=True, help="model folder (AutoModelForSequenceClassification)")
    init.add_argument("--data", required=True, help="CSV file (.csv or .csv.bz2)")
    init.add_argument("--text-column", required=True)
    init.add_argument("--label-column", required=True)
    init.add_argument("--out", required=True)
    init.add_argument("--rank", type=int, default=8)
    init.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default 2 * rank)")
    init.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r)")
    init.add_argument("--targets", nargs="+", default=["query", "value"])
    init.add_argument("--batch-size", type=int, default=16)
    init.add_argument("--max-length", type=int, default=128)
    init.add_argument("--seed", type=int, default=0)
    _add_fisher_arguments(init)
    init.set_defaults(handler=_command_init)

    _add_bench_commands(commands)
    return parser


def _add_bench_commands(commands: argparse._SubParsersAction) -> None:
    try:
        from .bench.cli import add_bench_commands
    except ImportError:  # the benchmark package is optional at this layer
        return
    add_bench_commands(commands)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"fisherlora {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
