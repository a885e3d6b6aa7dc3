"""The stage-2 verdict: intervals and p-values against independent computations, Holm by hand,
detectable effects by simulation, pooling across tasks, collapsed runs shown, the forest plot written."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from fisherlora.bench.paired import (
    holm,
    mean_interval,
    minimum_detectable_effect,
    normal_minimum_detectable_effect,
    paired_t_test,
    sign_flip_p_sampled,
    smallest_sign_flip_p,
)
from fisherlora.bench.results import ResultsFile
from fisherlora.bench.summary import summarize
from fisherlora.bench.verdict import verdict
from fisherlora.bench.verdict_report import format_verdict, write_verdict

from .records import make_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _brute_force_p(values: list[float]) -> float:
    observed = abs(sum(values))
    hits = sum(abs(sum(s * x for s, x in zip(signs, values, strict=True))) >= observed - 1e-12
               for signs in itertools.product((1, -1), repeat=len(values)))
    return hits / 2 ** len(values)


def _task_runs(task: str, tests: dict[str, list[float]], collapsed: dict[str, list[int]] | None = None,
               preset: str | None = None) -> list[dict[str, Any]]:
    """Stage 1 (one seed, 3 LRs; lora best on validation) and stage 2 (seeds 100.., LR 1e-3) of ``task``
    under ``preset`` (default: the task's name)."""
    preset = preset or task
    runs = [make_run(m, lr, 0, 0.9 if (m, lr) == ("lora", 1e-3) else 0.5, 0.5, task=task, preset=preset,
                     run_id=f"{preset}/{task}/{m}/{lr}") for m in tests for lr in (1e-4, 1e-3, 1e-2)]
    for method, values in tests.items():
        for index, value in enumerate(values):
            flag = 1.0 if index in (collapsed or {}).get(method, []) else 0.5
            runs.append(make_run(method, 1e-3, 100 + index, 0.5, value, task=task, preset=preset, stage="eval",
                                 run_id=f"{preset}/{task}/{method}/eval/{index}",
                                 test_predicted_majority_fraction=flag))
    return runs


def test_task_row_interval_and_p_against_independent_computations() -> None:
    lora = [0.70, 0.72, 0.71, 0.69, 0.73, 0.70]
    diffs = [0.03, -0.01, 0.02, 0.05, 0.04, 0.0]
    runs = _task_runs("text", {"lora": lora, "fisher_svd": [b + d for b, d in zip(lora, diffs, strict=True)]})
    (task,) = verdict(summarize(runs)).tasks
    (row,) = task.rows
    assert task.baseline == "lora" and row.n == 6
    assert row.mean == pytest.approx(np.mean(diffs))
    assert row.p_sign_flip == pytest.approx(_brute_force_p(diffs)) and row.p_holm == row.p_sign_flip
    # The 95% t interval is where the two-sided t-test stops rejecting at 0.05 (test inversion).
    for endpoint in (row.low, row.high):
        assert paired_t_test(np.asarray(diffs) - endpoint)[1] == pytest.approx(0.05, rel=1e-6)
    assert (row.wins, row.ties, row.losses) == (4, 1, 1)
    assert task.spread == pytest.approx(np.std(diffs, ddof=1)) and row.standardized == pytest.approx(
        np.mean(diffs) / np.std(diffs, ddof=1))


def test_mean_interval_degenerate_cases() -> None:
    assert all(math.isnan(x) for x in mean_interval([0.1]))
    assert mean_interval([0.2, 0.2]) == (0.2, 0.2)
    with pytest.raises(ValueError, match="level"):
        mean_interval([0.1, 0.2], level=1.5)


def test_holm_hand_worked() -> None:
    # sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> max with 0.06 = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.2, math.nan, 0.6])  # NaN is not a test: m = 2
    assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.6)
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []


def test_minimum_detectable_effect_monotone_and_has_its_power() -> None:
    by_sd = [minimum_detectable_effect(sd, 10) for sd in (0.01, 0.02, 0.05)]
    by_n = [minimum_detectable_effect(0.02, n) for n in (3, 5, 10, 20)]
    assert by_sd == sorted(by_sd) and by_sd[1] == pytest.approx(2 * by_sd[0])
    assert by_n == sorted(by_n, reverse=True) and len(set(by_n)) == 4
    assert minimum_detectable_effect(0.0, 10) == 0.0 and math.isnan(minimum_detectable_effect(0.1, 1))
    assert minimum_detectable_effect(1.0, 10, alpha=0.01) > minimum_detectable_effect(1.0, 10)
    # Power by simulation: normal differences with mean = MDE, sd 1, n 10 -> the t-test rejects 80%.
    effect = minimum_detectable_effect(1.0, 10)
    samples = np.random.default_rng(0).normal(effect, 1.0, size=(200_000, 10))
    t = samples.mean(axis=1) / (samples.std(axis=1, ddof=1) / math.sqrt(10))
    assert np.mean(np.abs(t) > stats.t.ppf(0.975, 9)) == pytest.approx(0.8, abs=0.005)
    assert normal_minimum_detectable_effect(0.1) == pytest.approx((1.959964 + 0.841621) * 0.1, rel=1e-5)
    with pytest.raises(ValueError, match="sd"):
        minimum_detectable_effect(-1.0, 10)


def test_sampled_sign_flip_is_exact_when_small_and_close_when_large() -> None:
    small = [0.3, -0.1, 0.2, 0.4, 0.1]
    assert sign_flip_p_sampled(small) == pytest.approx(_brute_force_p(small))
    large = np.r_[np.full(18, 0.1), np.full(6, -0.1)]  # |sum| = 1.2: p = P(|Binomial sum| >= 12) exactly
    exact = 2 * stats.binom.sf(17, 24, 0.5)  # at least 18 positive signs out of 24 (|2k - 24| >= 12), both tails
    assert sign_flip_p_sampled(large, resamples=200_000) == pytest.approx(exact, abs=0.002)


def test_pooled_effect_holm_and_exact_weighted_sign_flip() -> None:
    base = [0.70, 0.72, 0.71, 0.69]
    text_d = {"fisher_svd": [0.02, 0.03, -0.01, 0.02], "fisher_eig": [0.01, -0.02, 0.00, 0.01]}
    vision_d = {"fisher_svd": [0.05, 0.01, 0.04, 0.06], "fisher_eig": [-0.03, -0.01, -0.02, 0.02]}
    runs = []
    for task, diffs in (("text", text_d), ("vision", vision_d)):
        tests = {"lora": base, **{m: [b + x for b, x in zip(base, d, strict=True)] for m, d in diffs.items()}}
        runs += _task_runs(task, tests, collapsed={"fisher_eig": [1]} if task == "vision" else None)
    result = verdict(summarize(runs))
    spreads = {}
    for task, diffs in (("text", text_d), ("vision", vision_d)):
        (tv,) = [t for t in result.tasks if t.label == task]
        spreads[task] = float(np.median([np.std(d, ddof=1) for d in diffs.values()]))
        assert tv.spread == pytest.approx(spreads[task])
        assert [r.p_holm for r in tv.rows] == pytest.approx(holm([r.p_sign_flip for r in tv.rows]))
    pooled = {row.method: row for row in result.pooled}
    assert set(pooled) == {"fisher_eig", "fisher_svd"}
    for method in pooled:
        z = {task: np.asarray(d[method]) / spreads[task] for task, d in (("text", text_d), ("vision", vision_d))}
        assert pooled[method].mean == pytest.approx(np.mean([z["text"].mean(), z["vision"].mean()]))
        weighted = [x / (2 * 4) for task in ("text", "vision") for x in z[task]]
        assert pooled[method].p_sign_flip == pytest.approx(_brute_force_p(weighted))
        assert pooled[method].low < pooled[method].mean < pooled[method].high
    assert [r.p_holm for r in result.pooled] == pytest.approx(holm([r.p_sign_flip for r in result.pooled]))
    assert pooled["fisher_eig"].n_collapsed == 1 and pooled["fisher_eig"].n_runs == 8
    assert (pooled["fisher_svd"].wins, pooled["fisher_svd"].losses) == (7, 1)


def test_too_few_seeds_for_the_exact_test_read_unresolved_never_equal() -> None:
    # 3 seeds: the sign-flip test's smallest p is 0.25, so at level 0.05/2 nothing is detectable (MDE ∞)
    # however tight the interval; at 10 seeds and 2 methods (smallest p 0.00195 <= 0.025) it is finite.
    base = [0.70, 0.72, 0.71, 0.69, 0.73, 0.70, 0.72, 0.71, 0.69, 0.70]
    tiny = [0.0001, -0.0001, 0.0002, 0.0, 0.0001, -0.0002, 0.0001, 0.0, 0.0001, -0.0001]
    other = [0.001, -0.002, 0.001, 0.002, -0.001, 0.0, 0.001, -0.001, 0.002, 0.0]
    for n, finite in ((3, False), (10, True)):
        tests = {"lora": base[:n], "fisher_svd": [b + d for b, d in zip(base[:n], tiny, strict=False)],
                 "fisher_eig": [b + d for b, d in zip(base[:n], other, strict=False)]}
        result = verdict(summarize(_task_runs("text", tests)))
        (task,) = result.tasks
        row = {r.method: r for r in task.rows}["fisher_svd"]
        assert ("∞" in format_verdict(result)) == (not finite)
        assert smallest_sign_flip_p(n) == 2.0 ** (1 - n)
        assert (smallest_sign_flip_p(n) <= 0.05 / 2) == finite
        assert math.isfinite(row.mde) == finite and math.isfinite(task.mde) == finite
        assert row.reading == ("equal within ±MDE" if finite else "unresolved")
    assert smallest_sign_flip_p(25) == pytest.approx(1 / 100_001) and smallest_sign_flip_p(0) == 1.0


def test_regimes_of_one_task_count_once_averaged_per_seed() -> None:
    # text and text-long share the test set and seeds: pooled, they are one task whose per-seed unit is
    # the mean of the two regimes' standardized differences (text-long ran 3 of the 4 seeds so far).
    base = [0.70, 0.72, 0.71, 0.69]
    short_d = {"fisher_svd": [0.02, 0.03, -0.01, 0.02], "fisher_eig": [0.01, -0.02, 0.00, 0.01]}
    long_d = {"fisher_svd": [0.04, 0.00, 0.03], "fisher_eig": [-0.01, -0.03, 0.02]}
    vision_d = {"fisher_svd": [0.05, 0.01, 0.04, 0.06], "fisher_eig": [-0.03, -0.01, -0.02, 0.02]}
    regimes = (("text", "text", short_d), ("text", "text-long", long_d), ("vision", "vision", vision_d))
    runs = []
    for task, preset, diffs in regimes:
        tests = {"lora": base[:3] if preset == "text-long" else base,
                 **{m: [b + x for b, x in zip(base, d, strict=False)] for m, d in diffs.items()}}
        runs += _task_runs(task, tests, preset=preset)
    result = verdict(summarize(runs))
    assert [t.label for t in result.tasks] == ["text", "text-long/text", "vision"]
    assert [t.task for t in result.tasks] == ["text", "text", "vision"]
    spread = {preset: float(np.median([np.std(d, ddof=1) for d in diffs.values()])) for _, preset, diffs in regimes}
    pooled = {row.method: row for row in result.pooled}
    for method, row in pooled.items():
        short = np.asarray(short_d[method]) / spread["text"]
        long = np.asarray(long_d[method]) / spread["text-long"]
        text = np.array([(short[0] + long[0]) / 2, (short[1] + long[1]) / 2, (short[2] + long[2]) / 2, short[3]])
        vision = np.asarray(vision_d[method]) / spread["vision"]
        assert row.n == 8
        assert row.mean == pytest.approx((text.mean() + vision.mean()) / 2)
        assert row.p_sign_flip == pytest.approx(_brute_force_p([x / (2 * 4) for x in (*text, *vision)]))
        assert row.differences == pytest.approx((*text, *vision))
    # Two regimes of one task are not two tasks: nothing is pooled without a second task.
    only_text = [r for r in runs if r["task"] == "text"]
    assert verdict(summarize(only_text)).pooled == []


def test_verdict_report_and_forest_plot_are_written(tmp_path: Path) -> None:
    base = [0.70, 0.72, 0.71, 0.69, 0.70]
    folders = []
    for task, shift in (("text", 0.03), ("vision", -0.02)):
        folder = tmp_path / "results" / task
        results = ResultsFile(folder)
        tests = {"lora": base, "pissa": [b - 0.05 for b in base],
                 "fisher_svd": [b + shift + 0.005 * (i % 2) for i, b in enumerate(base)],
                 "fisher_eig": [b + 0.001 * i for i, b in enumerate(base)]}
        for run in _task_runs(task, tests, collapsed={"fisher_svd": [0, 3]}):
            results.append(run)
        folders.append(folder)
    written = write_verdict(folders, tmp_path / "results")
    assert written is not None
    markdown, plot, result = written
    assert plot == tmp_path / "results" / "forest.png" and plot.read_bytes().startswith(PNG_MAGIC)
    text = markdown.read_text(encoding="utf-8")
    assert "## text (accuracy) against **lora**" in text and "## Pooled across tasks" in text
    assert "| fisher_svd | 5 | +0.0320 [" in text and "| 2/5 |" in text
    rows = {(row.task, row.method): row for task in result.tasks for row in task.rows}
    assert ("text", "pissa") not in rows  # baselines are the reference, not compared
    # 5 seeds, all better by >= 0.03: the exact test cannot go below 2/2^5, so the verdict stays unresolved.
    assert rows[("text", "fisher_svd")].p_sign_flip == pytest.approx(2 / 32)
    assert rows[("text", "fisher_svd")].reading == "unresolved"
    # Differences 0, .001, ..., .004: a tight interval, but at 5 seeds no effect is detectable (MDE ∞),
    # so it is not read as equal either.
    assert rows[("text", "fisher_eig")].mde == math.inf
    assert rows[("text", "fisher_eig")].reading == "unresolved"


def test_report_command_writes_verdict_forest_plot_and_readme_section(tmp_path: Path) -> None:
    from fisherlora.cli import main

    base = [0.70, 0.72, 0.71]
    folders = []
    for task in ("text", "vision"):
        results = ResultsFile(tmp_path / "results" / task)
        for run in _task_runs(task, {"lora": base, "fisher_svd": [b + 0.01 * i for i, b in enumerate(base)]}):
            results.append(run)
        folders.append(str(results.directory))
    readme = tmp_path / "README.md"
    sections = "".join(f"<!-- results:{name}:start -->\n<!-- results:{name}:end -->\n"
                       for name in ("text", "vision", "overview", "verdict"))
    readme.write_text(sections)
    assert main(["report", *folders, "--readme", str(readme)]) == 0
    assert (tmp_path / "results" / "forest.png").read_bytes().startswith(PNG_MAGIC)
    assert "| fisher_svd | 3 | +0.0100 [" in (tmp_path / "results" / "verdict.md").read_text(encoding="utf-8")
    section = readme.read_text(encoding="utf-8").split("<!-- results:verdict:start -->")[1]
    assert "## Pooled across tasks" in section and "(results/forest.png)" in section


@pytest.mark.parametrize("missing", ["vision", "overview", "verdict", "the file"])
def test_report_checks_every_readme_section_before_writing_anything(tmp_path: Path, missing: str, capsys) -> None:
    from fisherlora.cli import main

    base = [0.70, 0.72, 0.71]
    folders = []
    for task in ("text", "vision"):
        results = ResultsFile(tmp_path / "results" / task)
        for run in _task_runs(task, {"lora": base, "fisher_svd": base}):
            results.append(run)
        folders.append(str(results.directory))
    readme = tmp_path / "README.md"
    if missing != "the file":
        readme.write_text("".join(f"<!-- results:{name}:start -->\n<!-- results:{name}:end -->\n"
                                  for name in ("text", "vision", "overview", "verdict") if name != missing))
    assert main(["report", *folders, "--readme", str(readme)]) == 2
    error = capsys.readouterr().err
    assert (f"<!-- results:{missing}:start -->" if missing != "the file" else "no such file") in error
    written = sorted(path.name for path in (tmp_path / "results").rglob("*")
                     if path.is_file() and path.suffix != ".lock")
    assert written == ["runs.jsonl", "runs.jsonl"], "nothing written before the README was checked"
    assert not readme.exists() if missing == "the file" else "<!-- results:text:end -->" in readme.read_text()


def test_no_stage_two_runs_no_verdict(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path)
    for run in _task_runs("text", {"lora": [], "fisher_svd": []}):
        results.append(run)
    assert write_verdict([tmp_path], tmp_path) is None
    assert not (tmp_path / "verdict.md").exists() and not (tmp_path / "forest.png").exists()


def test_option_variants_are_reported_under_their_own_names(tmp_path: Path) -> None:
    """A method name with an option suffix (`+source=gradient`: '+' and '=') goes through the
    per-task report, the overview, the verdict, their plots and the README sections as itself."""
    from fisherlora.cli import main

    base = [0.70, 0.72, 0.71]
    variant = "fisher_zero+source=gradient"
    folders = []
    for task in ("text", "vision"):
        results = ResultsFile(tmp_path / "results" / task)
        tests = {"lora": base, "fisher_zero": [b + 0.01 for b in base], variant: [b - 0.02 for b in base]}
        for run in _task_runs(task, tests):
            results.append(run)
        folders.append(str(results.directory))
    readme = tmp_path / "README.md"
    readme.write_text("".join(f"<!-- results:{name}:start -->\n<!-- results:{name}:end -->\n"
                              for name in ("text", "vision", "overview", "verdict")))
    assert main(["report", *folders, "--readme", str(readme)]) == 0
    verdict_text = (tmp_path / "results" / "verdict.md").read_text(encoding="utf-8")
    assert f"| {variant} | 3 | -0.0200 [" in verdict_text and "| fisher_zero | 3 | +0.0100 [" in verdict_text
    assert f"| {variant} |" in (tmp_path / "results" / "overview.md").read_text(encoding="utf-8")
    for folder in folders:
        assert f"| {variant} |" in (Path(folder) / "summary.md").read_text(encoding="utf-8")
    assert readme.read_text(encoding="utf-8").count(f"| {variant} |") >= 4
    assert sorted(path.name for path in (tmp_path / "results").rglob("*") if "=" in path.name) == []
