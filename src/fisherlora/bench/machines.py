"""Which machines made the stage-2 runs: paired differences are cleanest when every run of a seed was
made on one machine (other CPU kernels round differently, and training can amplify that; README,
"Reruns")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .selection import stage_of


def machine_of(record: Mapping[str, Any]) -> tuple[str, str]:
    """`(platform, CPU kernels' instruction set)` of a run record ("?" where not recorded)."""
    machine = record.get("machine") or {}
    return str(machine.get("platform", "?")), str(machine.get("cpu_capability", "?"))


def _count(machines: set[tuple[str, str]]) -> int:
    """Distinct machines: platforms, and within one the instruction sets recorded (a record made before
    they were recorded, "?", is taken to be any of them)."""
    platforms: dict[str, set[str]] = {}
    for platform, capability in machines:
        platforms.setdefault(platform, set()).add(capability)
    return sum(max(1, len(capabilities - {"?"})) for capabilities in platforms.values())


def stage_two_machines(runs_by_folder: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> str:
    """One markdown paragraph: per `(folder name, runs)` with stage-2 runs, how many machines made them,
    and the seeds whose runs name more than one (their paired differences mix machines). Empty when
    no folder has a stage-2 run."""
    parts = []
    for folder, runs in runs_by_folder:
        evaluation = [run for run in runs if stage_of(run) == "eval"]
        if not evaluation:
            continue
        count = _count({machine_of(run) for run in evaluation})
        by_seed: dict[Any, set[tuple[str, str]]] = {}
        for run in evaluation:
            by_seed.setdefault(run.get("seed"), set()).add(machine_of(run))
        split = sorted(str(seed) for seed, found in by_seed.items() if _count(found) > 1)
        text = f"`{folder}`: {len(evaluation)} runs on {count} machine{'s' if count > 1 else ''}"
        if split:
            text += f", seeds made on more than one: {', '.join(split)}"
        parts.append(text)
    if not parts:
        return ""
    return ("Machines of the stage-2 runs (platform and CPU kernels' instruction set as recorded; a seed made on "
            "more than one mixes machines into its paired differences): " + "; ".join(parts) + ".")
