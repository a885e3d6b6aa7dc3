"""One-off migration (run once, kept for the record): recompute the `run_id` of committed benchmark
records after run identity changed to hash only the settings each method declares it reads.

The records' recorded `config` (every setting, as run) is untouched; only `run_id` is rewritten,
atomically, so that `fisherlora bench` keeps resuming the committed results.

    python scripts/migrate_run_ids.py results/text/runs.jsonl results/lm/runs.jsonl ...
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

from fisherlora.bench.runner import RunSpec, TrainingConfig
from fisherlora.config import FisherConfig
from fisherlora.files import atomic_write_text
from fisherlora.init.fisher import FisherEigOptions, FisherGradOptions

# Before the method catalogue, method options were flat FisherConfig fields.
_OLD_OPTIONS = {"fisher_grad": (FisherGradOptions, {"grad_scale": "scale", "grad_gamma": "gamma", "grad_step": "step"}),
                "fisher_eig": (FisherEigOptions, {"eig_scale": "scale", "eig_gamma": "gamma"})}


def spec_of(record: dict) -> RunSpec:
    config = record["config"]
    old = dict(config["fisher"])
    known = {item.name for item in fields(FisherConfig)}
    fisher = FisherConfig(**{key: value for key, value in old.items() if key in known and key != "options"})
    method = record["method"].partition("@")[0].split("+")[0]
    if method in _OLD_OPTIONS:
        options_class, renames = _OLD_OPTIONS[method]
        fisher.options = options_class(**{new: old[name] for name, new in renames.items() if name in old})
    return RunSpec(task=record["task"], method=record["method"], seed=record["seed"], lr=record["lr"],
                   training=TrainingConfig(**config["training"]), fisher=fisher,
                   task_options=config["task_options"], preset=record.get("preset", "custom"))


def migrate(path: Path) -> int:
    lines = path.read_text().splitlines()
    changed = 0
    out = []
    for line in lines:
        record = json.loads(line)
        new_id = spec_of(record).run_id()
        changed += new_id != record["run_id"]
        record["run_id"] = new_id
        out.append(json.dumps(record, sort_keys=True))
    atomic_write_text(path, "\n".join(out) + "\n")
    return changed


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"{name}: {migrate(Path(name))} run ids rewritten")
