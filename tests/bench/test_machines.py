"""Which machines made the stage-2 runs, in the verdict."""

from __future__ import annotations

from bench.records import make_run
from fisherlora.bench.machines import stage_two_machines


def _run(seed: int, platform: str, capability: str | None = None, stage: str = "eval") -> dict:
    machine = {"platform": platform, **({"cpu_capability": capability} if capability else {})}
    return make_run("lora", 1e-3, seed, 0.7, 0.7, stage=stage, machine=machine)


def test_counts_machines_and_names_the_seeds_made_on_more_than_one():
    runs = [_run(100, "A", "AVX512"), _run(100, "A", "AVX512"), _run(101, "A", "AVX512"), _run(101, "B", "AVX2"),
            _run(102, "A", "AVX2"), _run(0, "C", stage="tune")]
    note = stage_two_machines([("lm", runs), ("text", [_run(100, "A")]), ("vision", [_run(0, "A", stage="tune")])])
    assert "`lm`: 5 runs on 3 machines, seeds made on more than one: 101" in note
    assert "`text`: 1 runs on 1 machine" in note and "vision" not in note  # stage 1 only: not listed


def test_a_record_without_the_instruction_set_matches_any_on_its_platform():
    """Records made before the instruction set was recorded must not split a seed on their own."""
    runs = [_run(100, "A"), _run(100, "A", "AVX512"), _run(101, "A"), _run(101, "A", "AVX2"), _run(101, "A", "AVX512")]
    note = stage_two_machines([("text", runs)])
    assert "`text`: 5 runs on 2 machines, seeds made on more than one: 101" in note


def test_no_stage_two_run_gives_no_note():
    assert stage_two_machines([("text", [_run(0, "A", stage="tune")])]) == ""
