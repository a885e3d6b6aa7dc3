"""What a new user gets wrong with `fisherlora init`, and what it must do then: refuse before any
work with an error that names the flag, file or value at fault, and never delete their files.

Also the two things such a user is owed at the end: a low-precision residual's rounding is reported
(and warned about), and a stopped command says what was kept.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

import fisherlora as fl
from fisherlora.cli import main
from fisherlora.data.records import read_labeled_examples
from fisherlora.jobs import common
from fisherlora.jobs.common import check_output_folder
from fisherlora.writes import WriteLog
from models import lm_batches, save_causal_lm, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = tiny_tokenizer()
    return save_causal_lm(tmp_path_factory.mktemp("tiny_llama"), tiny_llama(len(tokenizer)), tokenizer)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Sort: b a {i} ->", "completion": f" a b {i}"}) + "\n"
                            for i in range(8)))
    return path


@pytest.fixture
def no_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Statistics would fail the test: each refusal here must come before them."""
    def collect(*args: object, **kwargs: object) -> None:
        raise AssertionError("the statistics ran before the bad input was refused")
    monkeypatch.setattr(common, "collect_fisher", collect)


def run_init(model_dir: Path, data: Path, out: Path | str, *extra: str) -> int:
    return main(["init", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--rank", "2",
                 "--batch-size", "4", "--no-progress", *extra])


def refused(capsys: pytest.CaptureFixture[str], code: int, *fragments: str) -> None:
    error = capsys.readouterr().err
    assert code == 2, error
    for fragment in fragments:
        assert fragment in error, error


# ----------------------------------------------------------------------------- the output folder


def test_an_output_folder_with_other_files_is_refused_and_left_as_it_was(
        llama_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_statistics: None):
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "adapter").mkdir()  # an output's name beside the user's file does not make it an output
    refused(capsys, run_init(llama_dir, data, out), f"--out {out} holds files that fisherlora init did not write",
            "notes.txt")
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter").is_dir()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d.jsonl", "work"], "nothing staged beside it"


@pytest.mark.parametrize("inside", ["data", "model"])
def test_an_output_folder_holding_an_input_is_refused(inside: str, llama_dir: Path, data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str], no_statistics: None):
    # Even named like an output: replacing the folder would delete the input.
    out = data.parent if inside == "data" else llama_dir.parent
    refused(capsys, run_init(llama_dir, data, out), f"would replace the folder that holds --{inside}")
    assert data.is_file() and (llama_dir / "config.json").is_file()


def test_check_output_folder_accepts_new_empty_and_previous_outputs_and_refuses_a_file(tmp_path: Path):
    check_output_folder(tmp_path / "new", {})
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", {})
    previous = tmp_path / "previous"
    for name in ("adapter", "residual_model"):
        (previous / name).mkdir(parents=True)
    (previous / "report.json").write_text("{}")
    check_output_folder(previous, {"--data": tmp_path / "d.jsonl"})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file", {})


def test_a_previous_output_is_replaced_and_relative_paths_are_recorded_absolute(
        llama_dir: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert run_init(llama_dir, Path("d.jsonl"), "out", "--batches", "1") == 0
    assert run_init(llama_dir, Path("d.jsonl"), "out", "--batches", "1", "--method", "fisher_eig") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["job"]["fisher"]["method"] == "fisher_eig"
    assert report["data"] == str(data) and report["job"]["out"] == str(tmp_path / "out")


def test_out_dot_is_checked_like_any_folder(llama_dir: Path, data: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            no_statistics: None):
    # It used to fail after the whole run with "PosixPath('.') has an empty name".
    monkeypatch.chdir(tmp_path)
    refused(capsys, run_init(llama_dir, data, "."), f"--out {tmp_path} would replace the folder that holds --data")


# ----------------------------------------------------------------------------- flags


def test_one_misspelled_target_beside_a_correct_one_is_refused(llama_dir: Path, data: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               no_statistics: None):
    # PEFT alone would adapt v_proj and drop q_prj without a word.
    refused(capsys, run_init(llama_dir, data, tmp_path / "out", "--targets", "q_prj", "v_proj"),
            "--targets q_prj v_proj include q_prj, which matches no module", "self_attn.q_proj (x2)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("alpha", ["0", "-16"])
def test_alpha_must_be_positive_before_any_work(alpha: str, llama_dir: Path, data: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str], no_statistics: None):
    code = run_init(llama_dir, data, tmp_path / "out", "--alpha", alpha)
    refused(capsys, code, "--alpha must be > 0", f"got {alpha}")


@pytest.mark.parametrize(("flags", "message"), [
    (["--batches", "0"], "--batches must be >= 1 or None, got 0"),
    (["--damping", "-1"], "--damping must be >= 0, got -1.0"),
    (["--sketch-rank", "0"], "--sketch-rank must be >= 1, got 0"),
])
def test_statistics_settings_are_refused_by_their_flag(flags: list[str], message: str, llama_dir: Path, data: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       no_statistics: None):
    code = run_init(llama_dir, data, tmp_path / "out", *flags)
    refused(capsys, code, message)
    assert "FisherConfig." not in capsys.readouterr().err


def test_a_stopped_command_says_what_was_kept(monkeypatch: pytest.MonkeyPatch, llama_dir: Path, data: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import fisherlora.jobs.causal_lm as causal_lm

    def stopped(job: object) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(causal_lm, "run_causal_lm_init", stopped)
    assert run_init(llama_dir, data, tmp_path / "out") == 130
    assert "interrupted; what was finished is kept" in capsys.readouterr().err


# ----------------------------------------------------------------------------- classifier data


def test_classifier_data_may_be_jsonl(tmp_path: Path):
    rows = [{"text": "a joy", "label": 1}, {"text": "a mess", "label": "0"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert read_labeled_examples(path, "text", "label") == (["a joy", "a mess"], ["1", "0"])
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\na joy,1\na mess,0\n")
    assert read_labeled_examples(csv_path, "text", "label") == (["a joy", "a mess"], ["1", "0"])
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"sentence": "x", "label": 0}) + "\n")
    with pytest.raises(ValueError, match=r"line 2: no field 'text'; fields present: \['sentence', 'label'\]"):
        read_labeled_examples(path, "text", "label")


# ----------------------------------------------------------------------------- low-precision residuals


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_write_residual_returns_the_residual_rounding(dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    module = torch.nn.Linear(40, 30, bias=False).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(30, 40, generator=generator))
    weight = module.weight.detach().double().clone()
    product = 0.37 * torch.randn(30, 2, generator=generator, dtype=torch.float64) @ torch.randn(
        2, 40, generator=generator, dtype=torch.float64)
    rounding = WriteLog().write_residual(module, "linear", lambda: product)
    # The weight written is W - P rounded once (a float64 weight must not be written through an alias).
    assert torch.equal(module.weight.detach(), (weight - product).to(dtype))
    expected = float((module.weight.detach().double() + product - weight).norm() / weight.norm())
    assert rounding == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert {torch.float64: rounding < 1e-15, torch.float32: rounding < 1e-6}.get(dtype, 1e-4 < rounding < 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_low_precision_residual_is_reported_and_warned_about(dtype: torch.dtype):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(40, dtype=dtype), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj",
                                                                                                      "v_proj"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reports = fl.initialize_lora_fisher(model, lm_batches(count=2, vocab=40),
                                            fl.FisherConfig(method="fisher_svd", progress=False))
    roundings = [report.residual_rounding for report in reports]
    assert all(value is not None for value in roundings)
    warned = [str(item.message) for item in caught if "residual base weights" in str(item.message)]
    if dtype == torch.float32:
        assert max(roundings) < 1e-6 and not warned  # type: ignore[type-var]
    else:
        worst = max(reports, key=lambda report: report.residual_rounding or 0.0)
        assert len(warned) == 1 and repr(worst.name) in warned[0] and f"{worst.residual_rounding:.1e}" in warned[0]
    # A method that takes a real first step writes no residual (W stays as it is).
    stepped = get_peft_model(tiny_llama(40, dtype=dtype), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    reports = fl.initialize_lora_fisher(stepped, lm_batches(count=2, vocab=40),
                                        fl.FisherConfig(method="fisher_step", progress=False))
    assert {report.residual_rounding for report in reports} == {None}


def test_a_data_free_method_does_not_claim_a_fisher(llama_dir: Path, data: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]):
    # It printed "with milora (empirical Fisher) on 8 examples" though no statistic was collected.
    assert run_init(llama_dir, data, tmp_path / "out", "--method", "milora") == 0
    printed = capsys.readouterr().out
    assert "with milora (data-free: no statistics collected)" in printed and "Fisher)" not in printed
    assert run_init(llama_dir, data, tmp_path / "out", "--batches", "1") == 0
    assert "with fisher_svd (empirical Fisher) on 4 examples" in capsys.readouterr().out
