"""Benchmark tasks: a real model plus real data, loaded offline, behind one interface.

A task family is one module that registers a builder with
``@register_task("name", task_type)`` (:mod:`.base`); the builder's config dataclass (the type of
its ``config`` parameter) holds every size and knob, with CPU-friendly defaults.
``build_task("text", train_size=500)`` returns a :class:`Task`.

Built-in tasks (one module per family; a module added here registers more, see docs/architecture.md):

- ``text``   (:mod:`.text`)   -- MiniLM (all-MiniLM-L6-v2) sequence classification on Rotten Tomatoes.
- ``csv``    (:mod:`.text`)   -- bring your own: a Hugging Face model folder + a CSV with text/label columns.
- ``lm``     (:mod:`.lm`)     -- SmolLM2-135M-Instruct, causal-LM generation of short exact-match answers.
- ``vision`` (:mod:`.vision`) -- EfficientNet-Lite0 on Fashion-MNIST (10 classes, resized, grey -> RGB).

Every batch is a ``dict[str, Tensor]`` usable as ``model(**batch)``; it carries an HF-style
``labels`` key and the output has ``.logits`` and ``.loss``. The data order of
``train_loader(batch_size, seed)`` depends only on ``seed`` and the classifier head made by
``model_factory(seed)`` only on ``seed``, so methods compared at one seed see the same head
and the same batches. Heavy imports (transformers, efficientnet) happen inside functions.
Shared pieces: :mod:`.common` (batch type, subsets, head init, accuracy) and :mod:`.assets`
(package folders and the atomic cache of converted model copies).
"""

from __future__ import annotations

import importlib
import pkgutil

from .assets import cache_dir, cached_folder, package_dir
from .base import (
    TASK_TYPES,
    TASKS,
    Task,
    TaskSpec,
    TaskType,
    build_task,
    list_tasks,
    register_task,
    task_config,
)
from .common import (
    DEFAULT_SPLIT_FRACTIONS,
    Batch,
    ListDataset,
    classification_accuracy,
    eval_mode,
    init_linear_,
    quiet_transformers,
    take_subsets,
)
from .lm import (
    SMOLLM2_CACHE_NAME,
    SMOLLM2_GGUF,
    LMTaskConfig,
    answer_text,
    build_lm_task,
    encode_prompt_answer,
    exact_match_evaluator,
    left_pad,
    lm_collate,
    lm_problems,
    load_smollm2,
    smollm2_dir,
    split_lm_batch,
)
from .text import (
    CsvTaskConfig,
    TextTaskConfig,
    build_csv_task,
    build_text_task,
    find_head,
    guess_target_modules,
    load_sequence_classifier,
    minilm_dir,
    seeded_head_factory,
    sequence_classification_task,
    text_collate,
)
from .vision import (
    ImageClassifier,
    VisionTaskConfig,
    build_vision_task,
    image_collate,
    load_efficientnet_lite0,
    plain_pointwise_convs_,
)

# A task family added as a new module of this package registers itself without editing this file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DEFAULT_SPLIT_FRACTIONS", "SMOLLM2_CACHE_NAME", "SMOLLM2_GGUF", "TASKS", "TASK_TYPES", "Batch",
    "CsvTaskConfig", "ImageClassifier", "LMTaskConfig", "ListDataset", "Task", "TaskSpec", "TaskType",
    "TextTaskConfig", "VisionTaskConfig", "answer_text", "build_csv_task", "build_lm_task", "build_task",
    "build_text_task", "build_vision_task", "cache_dir", "cached_folder", "classification_accuracy",
    "encode_prompt_answer", "eval_mode", "exact_match_evaluator", "find_head", "guess_target_modules",
    "image_collate", "init_linear_", "left_pad", "list_tasks", "lm_collate", "lm_problems",
    "load_efficientnet_lite0", "load_sequence_classifier", "load_smollm2", "minilm_dir", "package_dir",
    "plain_pointwise_convs_", "quiet_transformers", "register_task", "seeded_head_factory",
    "sequence_classification_task", "smollm2_dir", "split_lm_batch", "take_subsets", "task_config",
    "text_collate",
]
