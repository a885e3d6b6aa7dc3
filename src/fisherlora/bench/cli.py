"""`fisherlora bench` and `fisherlora report`: argument parsing only; the work is in the runner."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..arguments import add_list_argument, non_negative_int, positive_float
from ..files import files_sha256

# `bench-init` also takes NAME+sketch: NAME with the sketch size of --sketch-rank/--sketch-threshold.
INIT_COST_SKETCH = "+sketch"


def check_method_names(methods: Sequence[str]) -> None:
    """Refuse, before any work, a benchmark method name that `build_model` would not accept: the
    same check (`effective_config`), with the known names added to the message.

    Raises:
        ValueError: naming the first bad name and listing the known ones.
    """
    from .baselines import effective_config, known_methods

    known = f"known methods: {', '.join(known_methods())} (suffixes: @true, +sketchK, +linear, +alloc, +KEY=VALUE)"
    for method in methods:
        try:
            effective_config(method)
        except ValueError as error:
            reason = str(error).split("; choose one of")[0]  # the catalogue's own list, replaced by the fuller one
            raise ValueError(f"{reason}; {known}") from None


def add_bench_commands(commands: Any) -> None:
    from .presets import PRESETS

    bench = commands.add_parser("bench", help="run the benchmark (default: the quick preset)")
    bench.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                       help="which benchmark (default: quick; docs/protocol.md): "
                            + "; ".join(f"{name}: {PRESETS[name].description}" for name in sorted(PRESETS)))
    bench.add_argument("--out", default=None, help="results folder (default results/<preset>)")
    add_list_argument(bench, "--methods", default=None,
                      help="subset of methods, separated by spaces or commas (e.g. lora,pissa,fisher_svd,"
                           "fisher_zero+source=gradient)")
    add_list_argument(bench, "--tasks", default=None, help="subset of the preset's tasks")
    add_list_argument(bench, "--seeds", non_negative_int, default=None,
                      help="subset of seeds (default: the preset's stage-1 seeds; stage 2: 100-109)")
    add_list_argument(bench, "--lrs", positive_float, default=None, help="replace the preset's LR grid")
    bench.add_argument("--model", default=None, help="bring your own: a sequence-classification model folder")
    bench.add_argument("--data", default=None, help="bring your own: CSV with text and label columns")
    bench.add_argument("--test-data", default=None, help="bring your own: separate test CSV")
    bench.add_argument("--text-column", default="text")
    bench.add_argument("--label-column", default="label")
    add_list_argument(bench, "--targets", default=None, help="LoRA target modules for --model")
    bench.add_argument("--stage", choices=["tune", "eval"], default="tune",
                       help="tune (stage 1): the LR grid on the preset's seeds; eval (stage 2): each method at its "
                            "stage-1 LR read from the same results folder, on fresh seeds (default 100-109) and "
                            "larger test sets (docs/protocol.md)")
    bench.add_argument("--no-report", action="store_true", help="do not write summary.md and plots at the end")
    bench.add_argument("--plan", action="store_true",
                       help="print the planned runs per task and method (LRs; runs done, running elsewhere, left) "
                            "and exit without running any: with --stage eval, the LRs stage 1 chose, after the "
                            "same checks")
    bench.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's; 1 per process when several processes share "
                            "the folder, one per core)")
    bench.set_defaults(handler=command_bench)

    init_cost = commands.add_parser("bench-init", help="time each initialization on the same calibration batches")
    init_cost.add_argument("--task", default="text", choices=[name for name in PRESETS if name in PRESETS[name].tasks],
                           help="a task with a preset of its own name (its sizes and options come from there)")
    add_list_argument(init_cost, "--methods", default=None,
                      help=f"methods to time: any name bench takes, or NAME{INIT_COST_SKETCH} (sketched per "
                           "--sketch-rank/--sketch-threshold)")
    init_cost.add_argument("--batches", type=int, default=32, help="calibration batches")
    init_cost.add_argument("--batch-size", type=int, default=16)
    init_cost.add_argument("--repeats", type=int, default=3)
    init_cost.add_argument("--no-epoch", action="store_true", help="skip timing one training epoch")
    init_cost.add_argument("--out", default="results/init_cost")
    init_cost.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    init_cost.add_argument("--sketch-rank", type=int, default=64, help="k of the NAME+sketch methods")
    init_cost.add_argument("--sketch-threshold", type=int, default=256, help="sketch factors larger than this")
    add_list_argument(init_cost, "--targets", default=None,
                      help="LoRA target modules (names, spaces or commas) or all-linear (PEFT's spelling: every "
                           "linear layer except the output layer or classifier head); default: the task's")
    init_cost.add_argument("--no-floor", action="store_true", help="skip timing the forward+backward floor")
    init_cost.add_argument("--readme", default=None,
                           help="also fill the README section named after --out's folder with every table there")
    init_cost.add_argument("--count-only", action="store_true",
                           help="only count the multiply-adds of the targeted layers (the arith. columns): one "
                                "forward and backward per batch, nothing timed, no file written")
    init_cost.set_defaults(handler=command_init_cost)

    report = commands.add_parser("report", help="turn RESULTS_DIR/runs.jsonl into summary.md and plots; with "
                                 "several folders also an across-task overview.md/.png in their common parent")
    report.add_argument("results_dirs", nargs="+", metavar="results_dir")
    report.add_argument("--readme", default=None,
                        help="also fill the README section <!-- results:NAME:start/end --> (NAME: the folder's name; "
                             "'overview' for the across-task table when several folders are given)")
    report.set_defaults(handler=command_report)

    compare = commands.add_parser("compare-runs", help="compare rerun records with the reference records of the "
                                  "same run ids (did a code change move the results?)")
    compare.add_argument("reference_dir", help="folder whose runs.jsonl holds the reference records")
    compare.add_argument("rerun_dir", help="folder whose runs.jsonl holds the reruns (bench --out RERUN_DIR ...)")
    compare.add_argument("--out", default=None, help="also write the table to this markdown file")
    compare.add_argument("--readme", default=None,
                         help="also fill the README section <!-- results:rerun_NAME:start/end --> (NAME: the rerun "
                              "folder's name)")
    compare.set_defaults(handler=command_compare_runs)


def _byo_preset(args: argparse.Namespace) -> Any:
    from .presets import Preset, get_preset

    if args.model is None or args.data is None:
        raise ValueError("bring your own data needs both --model DIR and --data FILE.csv")
    text_plan = get_preset("text").tasks["text"]
    # Absolute paths and the files' contents in the run ids: the same file named from another folder
    # is the same run, an edited file (same name) a new one, whose runs must not be taken as done.
    data_files = [os.path.abspath(args.data), *([os.path.abspath(args.test_data)] if args.test_data else [])]
    options: dict[str, Any] = {"model_dir": os.path.abspath(args.model), "train_csv": data_files[0],
                               "test_csv": data_files[1] if args.test_data else None,
                               "text_column": args.text_column, "label_column": args.label_column,
                               "data_sha256": files_sha256(*data_files)}
    if args.targets:
        options["target_modules"] = tuple(args.targets)
    plan = replace(text_plan, options=options)
    base = get_preset(args.preset)
    return Preset(name=f"csv-{args.preset}", description="bring your own model and CSV", tasks={"csv": plan},
                  seeds=base.seeds, method_list=base.method_list)


def plan_table(specs: list[Any], done: set[str], running: set[str]) -> str:
    """A markdown table of `specs` per task and method: the LRs, and how many runs are done (their
    ids in `done`), running in another process (ids in `running`) and left."""
    from .formatting import fmt_lr

    rows: dict[tuple[str, str], list[Any]] = {}
    for spec in specs:
        rows.setdefault((spec.task, spec.method), []).append(spec)
    lines = ["| task | method | LRs | runs | done | running elsewhere | left |", "|---|---|---|---|---|---|---|"]
    for (task, method), group in rows.items():
        ids = {spec.run_id() for spec in group}
        finished, elsewhere = len(ids & done), len(ids & running)
        lrs = ", ".join(fmt_lr(lr) for lr in sorted({spec.lr for spec in group}))
        lines.append(f"| {task} | {method} | {lrs} | {len(ids)} | {finished} | {elsewhere} | "
                     f"{len(ids) - finished - elsewhere} |")
    return "\n".join(lines)


def command_bench(args: argparse.Namespace) -> int:
    from .formatting import counted
    from .presets import get_preset
    from .processes import process_rank
    from .report import format_table, write_report
    from .results import ResultsFile, RunClaims
    from .runner import run_all
    from .summary import summarize
    from .tasks import build_task

    if args.methods:
        check_method_names(args.methods)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    preset = _byo_preset(args) if (args.model or args.data) else get_preset(args.preset)
    out = Path(args.out or f"results/{preset.name}")
    results = ResultsFile(out)
    if args.stage == "eval":
        from .stages import eval_specs

        if args.lrs:
            raise ValueError("--lrs is for stage 1 only: stage 2 takes each method's LR from stage 1's runs")
        specs = eval_specs(preset, results.records(), methods=args.methods, tasks=args.tasks, seeds=args.seeds,
                           source=str(results.path))
    else:
        if args.lrs:
            for plan in preset.tasks.values():
                plan.lrs, plan.method_lrs, plan.third_lr = list(args.lrs), {}, None
        specs = preset.specs(methods=args.methods, tasks=args.tasks, seeds=args.seeds)
    cache: dict[str, Any] = {}

    def task_factory(spec: Any) -> Any:
        key = f"{spec.task}:{sorted(spec.task_options.items())}"
        if key not in cache:
            cache.clear()  # one task in memory at a time
            cache[key] = build_task(spec.task, **spec.task_options)
        return cache[key]

    run_ids, done = {spec.run_id() for spec in specs}, results.done_ids()
    done_before = len(done & run_ids)
    running_ids = RunClaims(out).held_elsewhere_ids(run_ids - done)
    shared = f", {len(running_ids)} running in other processes sharing the folder" if running_ids else ""
    print(f"preset {preset.name}, stage {args.stage}: {counted(len(specs), 'run')} ({done_before} already in "
          f"{results.path}{shared}); tasks {', '.join(sorted({s.task for s in specs}))}, "
          f"{counted(len({s.method for s in specs}), 'method')}, "
          f"seeds {', '.join(str(seed) for seed in sorted({s.seed for s in specs}))}")
    if args.plan:
        print(plan_table(specs, done, running_ids))
        return 0
    check_calibration_sizes([spec for spec in specs if spec.run_id() not in done], task_factory)
    records = run_all(specs, results, task_factory)
    if process_rank()[0] != 0:  # under DDP only rank 0 reports (run_all already waited for the file)
        return 0
    runs = [record for record in results.records() if record.get("preset") == preset.name]
    print(format_table(summarize(runs)))
    if not args.no_report:
        running = RunClaims(out).held_elsewhere(run_ids - results.done_ids())
        if running:  # the last process sharing the folder writes it, with every run
            print(f"report: not written, {running} run(s) still running in other processes sharing {out}")
        else:
            print(f"report: {write_report(out)}")
    failed = [record for record in records if record.get("error")]
    if failed:
        print(f"{len(failed)} of the {len(records)} runs made by this command failed (their `error` in "
              f"{results.path}); the first: {failed[0]['run_id']}: {failed[0]['error']}", file=sys.stderr)
        return 1
    return 0


def check_calibration_sizes(specs: list[Any], task_factory: Callable[[Any], Any]) -> None:
    """Refuse, before any run, a user's CSV whose training split is smaller than the calibration
    batches the runs draw from it (every run draws them, whatever its method).

    Raises:
        ValueError: naming the split's size, what the runs need, and the CSV rows that would give it.
    """
    # One csv task per command, with the preset's one training config: its first spec answers for all.
    # The packaged tasks' splits are sized for their presets.
    spec = next((spec for spec in specs if spec.task == "csv"), None)
    if spec is None:
        return
    needed = spec.training.calibration_batches * spec.training.calibration_batch_size
    task = task_factory(spec)
    have = len(task.train_examples)
    if have < needed:
        # The training CSV's rows are its splits' examples (the test split too, unless a test CSV gives it).
        rows = have + len(task.val_examples) + (len(task.test_examples) if task.config.test_csv is None else 0)
        fraction = have / max(1, rows)
        raise ValueError(
            f"task 'csv': the runs draw {spec.training.calibration_batches} calibration batches of "
            f"{spec.training.calibration_batch_size} = {needed} training examples, but the training split of "
            f"{spec.task_options['train_csv']} has {have} (about {fraction:.0%} of its rows): give a CSV of "
            f"at least {math.ceil(needed / max(fraction, 1e-9))} rows")


def command_compare_runs(args: argparse.Namespace) -> int:
    from ..files import atomic_write_text
    from .rerun import compare_folders

    section = f"rerun_{Path(args.rerun_dir).name}"
    if args.readme:  # before any output: a README without the section's markers writes nothing
        from .readme import require_section

        require_section(Path(args.readme), section)
    table = compare_folders(args.reference_dir, args.rerun_dir)
    print(table)
    if args.out:
        atomic_write_text(Path(args.out), table + "\n")
        print(f"wrote {args.out}")
    if args.readme:
        from .readme import replace_readme_section

        command = f"fisherlora compare-runs {args.reference_dir} {args.rerun_dir}"
        body = f"{table}\n\nGenerated by `{command} --readme {Path(args.readme).name}`."
        print(f"updated {replace_readme_section(Path(args.readme), section, body)}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from .readme import require_section, update_readme, update_readme_overview
    from .report import format_table, write_report
    from .results import load_runs
    from .summary import summarize

    if args.readme:  # every section this report fills, before any file is written
        with_eval = any(run.get("stage") == "eval" for folder in args.results_dirs for run in load_runs(folder))
        sections = [Path(folder).name for folder in args.results_dirs]
        sections += ["overview"] * (len(args.results_dirs) > 1) + ["verdict"] * with_eval
        for section in sections:
            require_section(Path(args.readme), section)
    for results_dir in args.results_dirs:
        path = write_report(results_dir)
        print(format_table(summarize(load_runs(results_dir))))
        print(f"wrote {path}")
        if args.readme:
            print(f"updated {update_readme(args.readme, results_dir)}")
    if len(args.results_dirs) > 1:
        from .overview import format_overview, write_overview

        markdown_path, plot_path, summaries = write_overview(args.results_dirs)
        print(format_overview(summaries))
        print(f"wrote {markdown_path} and {plot_path}")
        if args.readme:
            print(f"updated {update_readme_overview(args.readme, args.results_dirs, summaries, plot_path)}")
    _report_verdict(args)
    return 0


def _report_verdict(args: argparse.Namespace) -> None:
    """verdict.md and forest.png next to the overview (or in the one folder), when there are stage-2 runs."""
    from .readme import update_readme_verdict
    from .results import common_folder
    from .verdict_report import format_verdict, write_verdict

    written = write_verdict(args.results_dirs, common_folder(args.results_dirs))
    if written is None:
        print("no stage-2 (eval) runs: no verdict")
        return
    markdown_path, plot_path, result = written
    print(format_verdict(result))
    print(f"wrote {markdown_path} and {plot_path}")
    if args.readme:
        print(f"updated {update_readme_verdict(args.readme, args.results_dirs, result, plot_path)}")


def command_init_cost(args: argparse.Namespace) -> int:
    import shlex

    from .init_cost import (
        ALL_LINEAR,
        DEFAULT_METHODS,
        InitCostConfig,
        count_init_work,
        format_init_cost,
        format_work_per_token,
        run_init_cost,
    )
    from .init_cost_readme import update_readme_init_cost

    if args.targets and ALL_LINEAR in args.targets and args.targets != [ALL_LINEAR]:
        raise ValueError(f"--targets {ALL_LINEAR} must be the only value")
    if args.count_only and args.readme:
        raise ValueError("--count-only writes no file: it cannot fill --readme")
    if args.readme:
        from .readme import require_section

        require_section(Path(args.readme), Path(args.out).name)  # before any work
    if args.methods:
        # NAME+sketch is checked as NAME+sketch1: a valid name with a sketch (refused for PEFT's baselines).
        check_method_names([f"{name}1" if name.endswith(INIT_COST_SKETCH) else name for name in args.methods])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    config = InitCostConfig(task=args.task, methods=args.methods or list(DEFAULT_METHODS),
                            calibration_batches=args.batches, batch_size=args.batch_size, repeats=args.repeats,
                            reference_epoch=not args.no_epoch, sketch_rank=args.sketch_rank,
                            sketch_threshold=args.sketch_threshold, floor=not args.no_floor,
                            targets=ALL_LINEAR if args.targets == [ALL_LINEAR] else args.targets,
                            command=shlex.join(["fisherlora", *args.argv]))
    if args.count_only:
        print(format_work_per_token(count_init_work(config), config.methods))
        return 0
    print(format_init_cost(run_init_cost(config, args.out)))
    if args.readme:
        print(f"updated {update_readme_init_cost(args.readme, args.out)}")
    return 0
