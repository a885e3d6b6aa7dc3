"""Command line: `fisherlora init`, `fisherlora methods` (and the benchmark commands)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .arguments import add_list_argument
from .config import FisherConfig
from .jobs.common import DTYPES, TASKS, is_regular_expression

MAX_PRINTED_LAYERS = 24  # beyond this, the per-layer lines are in report.json only


def _initializer_entries() -> list[Any]:
    from .init.catalog import ordered_entries
    from .methods import CATALOG  # noqa: F401  (every method registered)

    return [entry for entry in ordered_entries() if entry.function is not None]


def _fisher_config(args: argparse.Namespace) -> FisherConfig:
    from .cli_config import fisher_config_from_arguments

    # Progress as asked: the statistics pass itself draws a bar on a terminal, one line in a log file.
    return fisher_config_from_arguments(args, _initializer_entries())


def _command_methods(args: argparse.Namespace) -> int:
    from .init.catalog import ordered_entries
    from .methods import methods_table

    if args.readme:
        from .bench.readme import replace_readme_section

        print(f"methods table: {replace_readme_section(Path(args.readme), 'methods', methods_table())}")
        return 0
    if args.markdown:
        print(methods_table())
        return 0
    for entry in ordered_entries():
        print(f"{entry.name:<14} [{entry.family}] {entry.description}")
    return 0


TASK_FIELDS = {"seq-cls": ("text_column", "label_column"),
               "causal-lm": ("prompt_field", "completion_field", "messages_field")}
JOB_FIELDS = ("rank", "alpha", "targets", "dtype", "device", "batch_size", "max_length", "seed")


def _job_classes() -> dict[str, type]:
    from .jobs.causal_lm import CausalLMInitJob
    from .jobs.seq_cls import SeqClsInitJob

    return {"seq-cls": SeqClsInitJob, "causal-lm": CausalLMInitJob}


def _job_default(job_class: type, name: str) -> Any:
    spec = {item.name: item for item in dataclasses.fields(job_class)}[name]
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def _defaults_help(name: str) -> str:
    """"default: X" from the job dataclasses, per task when the tasks differ."""
    values = {task: _job_default(job_class, name) for task, job_class in _job_classes().items()}
    shown = {task: " ".join(value) if isinstance(value, list) else value for task, value in values.items()}
    if len(set(map(str, shown.values()))) == 1:
        return f"default: {next(iter(shown.values()))}"
    return "default: " + ", ".join(f"{value} for {task}" for task, value in shown.items())


def _defaults_help_one(task: str, name: str) -> str:
    return f"default: {_job_default(_job_classes()[task], name)}"


def _command_init(args: argparse.Namespace) -> int:
    from .jobs.causal_lm import run_causal_lm_init
    from .jobs.common import model_config, resolve_task
    from .jobs.seq_cls import run_seq_cls_init

    task = resolve_task(args.model, model_config(args.model), args.task)
    for other, names in TASK_FIELDS.items():
        given = [name for name in names if getattr(args, name) is not None]
        if other != task and given:
            raise ValueError(f"--{given[0].replace('_', '-')} applies to --task {other}; the model in {args.model} "
                             f"is initialized as {task}")
    values = {name: getattr(args, name) for name in (*JOB_FIELDS, *TASK_FIELDS[task])}
    job = _job_classes()[task](model=args.model, data=args.data, out=args.out, use_rslora=args.rslora,
                               fisher=_fisher_config(args),
                               **{name: value for name, value in values.items() if value is not None})
    summary = run_causal_lm_init(job) if task == "causal-lm" else run_seq_cls_init(job)
    layers = summary["layers"]
    source = (f"({job.fisher.fisher} Fisher) on {summary['examples']} examples"
              if "stats.safetensors" in summary["outputs"] else "(data-free: no statistics collected)")
    print(f"initialized {len(layers)} layers of a {task} model with {job.fisher.method} {source}; "
          f"wrote {', '.join(summary['outputs'])} to {job.out}")
    energies = [layer["captured_energy"] for layer in layers if layer["captured_energy"] is not None]
    if len(layers) > MAX_PRINTED_LAYERS:
        if energies:
            print(f"  fisher energy captured per layer: min {min(energies):.3f}, max {max(energies):.3f}; "
                  f"every layer in {job.out}/report.json")
    else:
        for layer in layers:
            energy = layer["captured_energy"]
            print(f"  {layer['name']}: r={layer['rank']}" + ("" if energy is None else f" fisher energy={energy:.3f}"))
    if not job.fisher.captured_energy and any(layer["damping_added"] is not None for layer in layers):
        print("  (--captured-energy also reports the Fisher energy each layer's adapter holds)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fisherlora", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    methods = commands.add_parser("methods", help="list every initialization with one line each")
    methods.add_argument("--markdown", action="store_true", help="print the README's methods table")
    methods.add_argument("--readme", help="write the methods table into this README (between its methods markers)")
    methods.set_defaults(handler=_command_methods)

    init = commands.add_parser("init", help="initialize a LoRA adapter for a causal LM or a sequence classifier")
    init.add_argument("--model", required=True, help="model folder (config.json, weights, tokenizer)")
    init.add_argument("--data", required=True, help="causal-lm: JSONL or CSV of prompt/completion or messages "
                      "records; seq-cls: CSV with a text and a label column, or JSONL with those fields "
                      "(.bz2/.gz accepted)")
    init.add_argument("--out", required=True, help="output folder, replaced as a whole when complete: new, empty, "
                      "or a previous output (a folder with other files is refused)")
    init.add_argument("--task", choices=TASKS, default=None,
                      help="default: causal-lm when config.json names a *ForCausalLM/*LMHeadModel, else seq-cls")
    init.add_argument("--rank", type=int, default=None, help=_defaults_help("rank"))
    init.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default 2 * rank)")
    init.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r)")
    add_list_argument(init, "--targets", default=None, keep_whole=is_regular_expression,
                      help="all-linear, module names (spaces or commas), or one regular expression (full match); "
                      + _defaults_help("targets"))
    init.add_argument("--dtype", choices=DTYPES, default=None, help="dtype the model is loaded and the adapter "
                      "written in; statistics accumulate in float32; " + _defaults_help("dtype"))
    init.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    init.add_argument("--batch-size", type=int, default=None, help=_defaults_help("batch_size"))
    init.add_argument("--max-length", type=int, default=None, help="longest example in tokens (causal-lm: a "
                      "longer one is an error, never truncated; seq-cls: texts are truncated); "
                      + _defaults_help("max_length"))
    init.add_argument("--seed", type=int, default=None, help="seed of a new classification head")
    seq_cls = init.add_argument_group("seq-cls data (CSV columns or JSONL fields)")
    seq_cls.add_argument("--text-column", default=None, help=_defaults_help_one("seq-cls", "text_column"))
    seq_cls.add_argument("--label-column", default=None, help=_defaults_help_one("seq-cls", "label_column"))
    causal = init.add_argument_group("causal-lm data (JSONL/CSV fields)")
    causal.add_argument("--prompt-field", default=None, help=_defaults_help_one("causal-lm", "prompt_field"))
    causal.add_argument("--completion-field", default=None,
                        help=_defaults_help_one("causal-lm", "completion_field") + "; loss and statistics on it only")
    causal.add_argument("--messages-field", default=None, help="list of {role, content} messages rendered with the "
                        "tokenizer's chat template, loss on the assistant turns; "
                        + _defaults_help_one("causal-lm", "messages_field"))
    from .cli_config import add_fisher_arguments

    add_fisher_arguments(init, _initializer_entries())
    init.set_defaults(handler=_command_init)

    _add_bench_commands(commands)
    return parser


def _add_bench_commands(commands: argparse._SubParsersAction) -> None:
    try:
        from .bench.cli import add_bench_commands
    except ImportError:  # the benchmark package is optional at this layer
        return
    add_bench_commands(commands)


# transformers 5 deprecates the name PEFT still calls on every model it wraps: the warning is not for
# this command's user, who can do nothing about it, and it would open every command's output.
_THIRD_PARTY_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=_THIRD_PARTY_DEPRECATION, category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, written with results
    try:
        return int(args.handler(args))
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"fisherlora {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every write is atomic (a finished benchmark run is in runs.jsonl, an output folder is whole
        # or absent): a stop loses only the work in progress, and `bench` resumes where it stopped.
        print(f"fisherlora {args.command}: interrupted; what was finished is kept"
              + (" (run the same command again to resume)" if args.command == "bench" else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
