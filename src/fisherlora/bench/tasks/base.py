"""The task interface and the task registry.

A task family registers a builder ``(config) -> Task`` with ``@register_task(name, task_type)``;
the builder's config dataclass (the type of its ``config`` parameter) holds every size and knob.
``build_task(name, **overrides)`` builds it.
"""

from __future__ import annotations

import random
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from .common import Batch, ListDataset

# What the model is trained to do; adapters and initializers that treat tasks differently read
# this (e.g. EVA masks the prompt tokens of a causal LM), never the metric's name.
TaskType = Literal["sequence_classification", "causal_lm", "image_classification"]
TASK_TYPES: tuple[TaskType, ...] = typing.get_args(TaskType)


def check_task_type(task: str, task_type: str) -> None:
    """Raise ``ValueError`` naming ``task`` if ``task_type`` is not one of :data:`TASK_TYPES`."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"task {task!r}: task_type must be one of {list(TASK_TYPES)}, got {task_type!r}")


@dataclass
class Task:
    """A built benchmark task: model factory, LoRA targets, data loaders and the metric.

    - ``task_type``: one of :data:`TASK_TYPES` (what the model is trained to do).
    - ``model_factory(seed)`` -> a fresh base model (no adapters). Pretrained weights are the
      same on every call; a newly added classifier head is initialized from ``seed`` only.
    - ``target_modules`` / ``modules_to_save`` go straight into ``peft.LoraConfig``.
    - ``evaluate(model, loader)`` -> the metric in [0, 1], higher is better
      (``metric_name``: "accuracy" or "exact_match"); the model is put in eval mode and its
      training flag restored afterwards.
    - ``train_examples`` etc. are the raw examples after subsetting; ``collate`` turns a list
      of them into a :data:`Batch`.
    - ``example_length(example)`` -> its length in any unit that grows with its padded size (None:
      all examples are the same size); validation and test batches are formed from examples in
      order of length, so each batch pads to little more than its own examples.

    Raises ``ValueError`` at construction for a ``task_type`` outside :data:`TASK_TYPES`.
    """

    name: str
    config: Any
    task_type: TaskType
    metric_name: str
    model_factory: Callable[..., nn.Module]
    target_modules: list[str] | str
    modules_to_save: list[str]
    train_examples: Sequence[Any]
    val_examples: Sequence[Any]
    test_examples: Sequence[Any]
    collate: Callable[[list[Any]], Batch]
    evaluate: Callable[[nn.Module, Iterable[Batch]], float]
    num_labels: int | None = None
    label_names: list[str] = field(default_factory=list)
    tokenizer: Any = None
    example_length: Callable[[Any], int] | None = None

    def __post_init__(self) -> None:
        check_task_type(self.name, self.task_type)

    def train_loader(self, batch_size: int, seed: int) -> DataLoader:
        """Shuffled training batches; the order depends only on ``seed`` (fresh loader, same order)."""
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            ListDataset(self.train_examples), batch_size=batch_size, shuffle=True,
            generator=generator, collate_fn=self.collate,
        )

    def val_loader(self, batch_size: int = 64) -> DataLoader:
        """Validation batches in a fixed order (for choosing the learning rate)."""
        return self._fixed_loader(self.val_examples, batch_size)

    def test_loader(self, batch_size: int = 64) -> DataLoader:
        """Test batches in a fixed order (reported metric)."""
        return self._fixed_loader(self.test_examples, batch_size)

    def calibration_loader(self, num_batches: int, batch_size: int, seed: int) -> list[Batch]:
        """``num_batches`` full batches of training examples for statistics (e.g. the Fisher).

        Drawn from a permutation of the training split seeded by ``seed`` (independent of
        ``train_loader``'s stream). Returned as a list so it can be iterated several times.
        Raises ``ValueError`` when the training split holds fewer than
        ``num_batches * batch_size`` examples rather than silently returning fewer.
        """
        needed = num_batches * batch_size
        if num_batches < 1 or batch_size < 1:
            raise ValueError(f"calibration needs num_batches >= 1 and batch_size >= 1, got {num_batches}, {batch_size}")
        if needed > len(self.train_examples):
            raise ValueError(
                f"task {self.name!r}: calibration asks for {num_batches} x {batch_size} = {needed} examples "
                f"but the training split has {len(self.train_examples)}"
            )
        # An offset seed so calibration batches are not simply the first training batches.
        order = list(range(len(self.train_examples)))
        random.Random(f"calibration-{seed}").shuffle(order)
        return [
            self.collate([self.train_examples[i] for i in order[b * batch_size : (b + 1) * batch_size]])
            for b in range(num_batches)
        ]

    def _fixed_loader(self, examples: Sequence[Any], batch_size: int) -> DataLoader:
        # Evaluation metrics are means over examples, so their order is free: grouping similar
        # lengths cut padding, and with it a text stage-2 run's evaluation time (2,300 examples).
        if self.example_length is not None:
            length = self.example_length
            examples = sorted(examples, key=length)  # stable: ties keep the split's order
        return DataLoader(ListDataset(examples), batch_size=batch_size, shuffle=False, collate_fn=self.collate)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its builder, the builder's config dataclass, its task type and a one-line
    description (the first line of the builder's docstring)."""

    name: str
    builder: Callable[[Any], Task]
    config_cls: type
    task_type: TaskType
    description: str


TASKS: dict[str, TaskSpec] = {}
Builder = TypeVar("Builder", bound=Callable[..., Task])


def register_task(name: str, task_type: TaskType) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(config: SomeConfig) -> Task`` under ``name`` in :data:`TASKS`.

    The config class is read from the annotation of the builder's ``config`` parameter; the
    builder must return a :class:`Task` of ``task_type`` (checked by :func:`build_task`).
    Raises ``ValueError`` for a taken name or an unknown ``task_type``, ``TypeError`` for a
    builder without an annotated ``config`` parameter.
    """
    check_task_type(name, task_type)

    def decorate(builder: Builder) -> Builder:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        hints = typing.get_type_hints(builder)
        if "config" not in hints:
            raise TypeError(f"task builder {builder.__name__} needs an annotated `config` parameter")
        doc = (builder.__doc__ or "").strip().splitlines()
        TASKS[name] = TaskSpec(name, builder, hints["config"], task_type, doc[0] if doc else "")
        return builder

    return decorate


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(TASKS)


def task_config(name: str, **overrides: Any) -> Any:
    """The config dataclass of task ``name`` with defaults replaced by ``overrides``."""
    spec = _spec(name)
    _check_fields(spec, overrides)
    try:
        return spec.config_cls(**overrides)
    except TypeError as error:  # a required field (e.g. csv's model_dir) is missing
        raise ValueError(f"task {name!r}: {error}") from error


def build_task(name: str, config: Any = None, **overrides: Any) -> Task:
    """Build task ``name`` from ``config`` (default: the task's defaults) with ``overrides`` applied.

    Raises ``ValueError`` for an unknown task or config field, a config of the wrong class, or a
    builder whose task's type differs from the registered one.
    """
    spec = _spec(name)
    if config is None:
        config = task_config(name, **overrides)
    else:
        if not isinstance(config, spec.config_cls):
            raise ValueError(f"task {name!r} wants a {spec.config_cls.__name__}, got {type(config).__name__}")
        _check_fields(spec, overrides)
        config = replace(typing.cast(Any, config), **overrides)
    task = spec.builder(config)
    if task.task_type != spec.task_type:
        raise ValueError(f"task {name!r} is registered as {spec.task_type!r} but its builder "
                         f"{spec.builder.__name__} made a {task.task_type!r} task")
    return task


def _spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {list_tasks()}")
    return TASKS[name]


def _check_fields(spec: TaskSpec, overrides: dict[str, Any]) -> None:
    valid = {f.name for f in fields(spec.config_cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"task {spec.name!r} has no config field(s) {unknown}; valid fields: {sorted(valid)}")
