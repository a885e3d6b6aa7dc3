"""Run records for the statistics tests: one dict per line of ``runs.jsonl``, only the fields read."""

from __future__ import annotations

from typing import Any


def make_run(method: str, lr: float, seed: int, val: float, test: float, **extra: Any) -> dict[str, Any]:
    """A successful run of task ``t`` (preset ``p``) unless ``extra`` says otherwise."""
    return {
        "run_id": f"t/{method}/{lr}/{seed}", "preset": "p", "task": "t", "method": method, "seed": seed, "lr": lr,
        "metric_name": "accuracy", "val_metric": val, "test_metric": test, "final_train_loss": 1.0,
        "curve": {"step": [0, 10], "train_loss": [2.0, 1.0]}, "init_seconds": 1.0, "init_peak_rss_mb": 100.0,
        "init_stats_mb": 0.0, "train_seconds": 5.0, **extra,
    }
