"""Helpers shared by the task families: the batch type, an in-memory dataset, subsetting, seeded
head initialization, accuracy, and quiet model loading."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset

Batch = dict[str, torch.Tensor]
Example = TypeVar("Example")

# Train/val/test pool fractions of a task whose data come as one collection.
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


class ListDataset(Dataset, Generic[Example]):
    """A map-style dataset over an in-memory sequence of examples (any type the collate takes)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def take_subsets(
    name: str, pools: Sequence[Sequence[int]], sizes: Sequence[int | None], parts: Sequence[str]
) -> list[list[int]]:
    """First ``size`` indices of each pool (``None``: all); too few -> ``ValueError`` naming the field."""
    out: list[list[int]] = []
    for pool, size, part in zip(pools, sizes, parts, strict=True):
        if size is None:
            out.append(list(pool))
            continue
        if size < 1 or size > len(pool):
            raise ValueError(f"task {name!r}: {part}_size={size} but the {part} pool has {len(pool)} examples")
        out.append(list(pool[:size]))
    return out


def init_linear_(layer: nn.Linear, seed: int, std: float | None = None) -> None:
    """Re-initialize ``layer`` in place from ``seed`` alone (never the global RNG).

    ``std`` given: weight ~ N(0, std^2), bias 0 (BERT's head init). Otherwise PyTorch's
    default for ``nn.Linear``: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if std is not None:
            layer.weight.normal_(0.0, std, generator=generator)
            if layer.bias is not None:
                layer.bias.zero_()
            return
        bound = 1.0 / layer.in_features**0.5
        layer.weight.uniform_(-bound, bound, generator=generator)
        if layer.bias is not None:
            layer.bias.uniform_(-bound, bound, generator=generator)


def classification_accuracy(model: nn.Module, loader: Iterable[Batch]) -> float:
    """Fraction of examples whose argmax logit equals ``batch["labels"]``; 0.0 on an empty loader."""
    correct = total = 0
    with eval_mode(model), torch.no_grad():
        for batch in loader:
            logits = model(**batch).logits
            correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
            total += int(batch["labels"].numel())
    return correct / total if total else 0.0


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (no dropout), then the caller's train/eval flag again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (an expected "classifier MISSING") and progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
