"""Benchmark layer: tasks (real models and data that load offline), runner, statistics, report."""
