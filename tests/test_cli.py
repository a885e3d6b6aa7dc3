"""`fisherlora init` and `fisherlora methods` on a tiny BERT folder and a small CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fisherlora.cli import main
from models import tiny_bert

WORDS = ["good", "bad", "movie", "great", "awful", "plot", "fun", "boring", "the", "a"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    model = tiny_bert()
    model.base_model.save_pretrained(folder)  # a plain encoder, like MiniLM: no trained head
    return folder


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("review", "sentiment")) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def sample_rows(count: int = 24) -> list[tuple[str, str]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(count):
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (5,), generator=generator)]
        rows.append((" ".join(words), "pos" if index % 2 else "neg"))
    return rows


def run_init(model_dir: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["init", "--model", str(model_dir), "--data", str(data), "--text-column", "review",
                 "--label-column", "sentiment", "--rank", "2", "--out", str(out), "--batch-size", "8",
                 "--no-progress", *extra])


def test_init_writes_an_adapter_that_reproduces_the_base_function(model_dir: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    data = write_csv(tmp_path / "data.csv", sample_rows())
    out = tmp_path / "out"
    assert run_init(model_dir, data, out, "--targets", "query", "value", "--method", "fisher_svd",
                    "--captured-energy") == 0
    assert {p.name for p in out.iterdir()} == {"adapter", "residual_model", "stats.safetensors", "report.json"}
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == {"neg": 0, "pos": 1} and len(report["layers"]) == 4
    assert all(0 < layer["captured_energy"] <= 1 for layer in report["layers"])

    # residual model + adapter == original encoder + the same (new) head, before any training.
    residual = AutoModelForSequenceClassification.from_pretrained(out / "residual_model")
    initialized = PeftModel.from_pretrained(residual, str(out / "adapter")).eval()
    original = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    original.classifier.load_state_dict(initialized.base_model.model.classifier.modules_to_save["default"].state_dict())
    input_ids = torch.tensor([[2, 5, 6, 7, 3]])
    with torch.no_grad():
        difference = (initialized(input_ids=input_ids).logits - original(input_ids=input_ids).logits).abs().max()
    assert difference <= 1e-4


@pytest.mark.parametrize("method_flags", [
    ("--method", "lora_one", "--one-gamma", "16"),
    ("--method", "fisher_step", "--step-gamma", "8", "--rank-allocation", "fisher"),
], ids=["lora_one", "fisher_step+alloc"])
def test_init_with_a_real_first_step_writes_no_residual_and_converts_in_another_process(
        model_dir: Path, tmp_path: Path, method_flags: tuple[str, ...], capsys: pytest.CaptureFixture[str]):
    """LoRA-One and fisher_step (here with Fisher rank allocation) leave the base weights as they are:
    no residual model is written, the adapter folder records it, and `save_as_lora(initial_adapter=...)`
    then converts the trained adapter without subtracting the initial product: the original base plus
    the converted adapter is the trained model."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import fisherlora as fl

    data = write_csv(tmp_path / "data.csv", sample_rows())
    out = tmp_path / "out"
    assert run_init(model_dir, data, out, "--targets", "query", "value", *method_flags) == 0
    assert {p.name for p in out.iterdir()} == {"adapter", "stats.safetensors", "report.json"}
    assert json.loads((out / "adapter" / "fisherlora_initial.json").read_text()) == {"residual_written": False}
    layers = json.loads((out / "report.json").read_text())["layers"]
    assert (len({layer["rank"] for layer in layers}) > 1) == ("--rank-allocation" in method_flags)
    # Without --captured-energy the diagnostic is neither computed nor printed, and the flag is named.
    assert all(layer["captured_energy"] is None for layer in layers)
    printed = capsys.readouterr().out
    assert "fisher energy" not in printed and "--captured-energy" in printed

    def original() -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()

    model = PeftModel.from_pretrained(original(), str(out / "adapter"), is_trainable=True)
    input_ids, labels = torch.tensor([[2, 5, 6, 7, 3], [2, 9, 8, 3, 0]]), torch.tensor([1, 0])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=input_ids).logits
    fl.save_as_lora(model, tmp_path / "converted", initial_adapter=out / "adapter")
    loaded = PeftModel.from_pretrained(original(), str(tmp_path / "converted")).eval()
    with torch.no_grad():
        assert (loaded(input_ids=input_ids).logits - trained).abs().max() <= 1e-5


def test_init_refuses_a_missing_column(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = write_csv(tmp_path / "data.csv", sample_rows(), header=("review", "stars"))
    assert run_init(model_dir, data, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "sentiment" in error and "data.csv" in error
    assert not (tmp_path / "out").exists()


def test_init_refuses_labels_that_do_not_fit_a_trained_head(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            model_dir: Path):
    import shutil

    trained = tmp_path / "trained"
    shutil.copytree(model_dir, trained)
    tiny_bert(num_labels=2).save_pretrained(trained)  # a classifier with a 2-way head
    rows = [(text, str(index % 3)) for index, (text, _) in enumerate(sample_rows())]
    data = write_csv(tmp_path / "data.csv", rows)
    assert run_init(trained, data, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "do not fit the model's classification head with 2 outputs" in error and "['2']" in error


def test_init_refuses_rank_too_large(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = write_csv(tmp_path / "data.csv", sample_rows())
    code = main(["init", "--model", str(model_dir), "--data", str(data), "--text-column", "review",
                 "--label-column", "sentiment", "--rank", "64", "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert "rank r=64 must be between 1 and min(d_out=16, d_in=16)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_methods_lists_every_method(capsys: pytest.CaptureFixture[str]):
    import fisherlora as fl

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(fl.METHODS)
