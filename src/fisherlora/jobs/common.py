"""What every `fisherlora init` job shares: its settings, the checks made before any work (model
folder, task type, targets), the LoRA model, the initialization, and the atomic output folder."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from ..api import collect_fisher, initialize_lora_fisher
from ..config import FisherConfig
from ..conversion import write_initial_record
from ..files import staged_directory
from ..init.registry import get_initializer
from ..peft import LayerReport, base_weights_changed
from ..stats.container import FisherStats

TaskName = Literal["causal-lm", "seq-cls"]
DtypeName = Literal["float32", "bfloat16", "float16"]
TASKS: tuple[str, ...] = get_args(TaskName)
DTYPES: tuple[str, ...] = get_args(DtypeName)
ALL_LINEAR = "all-linear"  # PEFT's spelling: every nn.Linear / Conv1D except the output layer
CAUSAL_LM_ARCHITECTURE_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# A --targets value with one of these characters is a regular expression (PEFT: full match on the module name).
REGEX_CHARACTERS = set("*+?[](){}|^$\\")


@dataclass
class InitJob:
    """Settings of `fisherlora init` shared by every task; each task's job adds its data fields.

    Attributes:
        model: folder of a Hugging Face model (`config.json`, weights, tokenizer).
        data: data file (see the task's job).
        out: output folder, replaced atomically.
        rank, alpha: LoRA rank and alpha (`None`: `2 * rank`); `use_rslora` scales by `alpha / sqrt(r)`.
        targets: LoRA targets: `["all-linear"]`, module names (PEFT's suffix match), or one regular
            expression (full match); `None`: the task's default.
        dtype: dtype the model is loaded in; statistics are accumulated in float32 whatever it is,
            and the adapter is written in this dtype.
        device: where the model runs (`None`: "cuda" when available, else "cpu").
        batch_size, max_length: calibration batches and the longest example in tokens.
        seed: seed of new weights (a new classification head).
        fisher: `FisherConfig` (method, Fisher type, number of batches, damping, ...).
    """

    model: str
    data: str
    out: str
    rank: int = 8
    alpha: int | None = None
    use_rslora: bool = False
    targets: list[str] | None = None
    dtype: DtypeName = "float32"
    device: str | None = None
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    fisher: FisherConfig = field(default_factory=FisherConfig)

    def __post_init__(self) -> None:
        # Absolute paths: `--out .` has no folder name to stage beside, and report.json records
        # where the data and the outputs were whatever the working directory was.
        self.data, self.out = os.path.abspath(self.data), os.path.abspath(self.out)

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.rank

    def check(self) -> None:
        """Refuse settings that cannot work, before anything is loaded."""
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("rank", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"--alpha must be > 0 (the LoRA scaling is alpha / rank), got {self.alpha}")
        get_initializer(self.fisher.method)
        check_output_folder(self.out, {"--model": self.model, "--data": self.data})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fisher": self.fisher.to_dict()}


OUTPUT_NAMES = frozenset({"adapter", "stats.safetensors", "residual_model", "report.json"})
"""What `write_outputs` puts in the output folder: a folder holding only these is a previous output."""


def check_output_folder(out: str | Path, inputs: dict[str, str | Path]) -> None:
    """Refuse an output folder whose replacement would delete something `init` did not write.

    `write_outputs` replaces the whole folder, so it must be new, empty, or a previous output
    (only `OUTPUT_NAMES` in it), and must not hold an input (`inputs`: flag -> path).

    Raises:
        ValueError: `out` is a file, holds other entries (the first few are named), or holds an input.
    """
    folder = Path(os.path.abspath(out))
    for flag, path in inputs.items():
        place = Path(os.path.abspath(path))
        if place == folder or folder in place.parents:
            raise ValueError(f"--out {folder} would replace the folder that holds {flag} {place}: "
                             "give an output folder outside it")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"--out {folder} is a file, not a folder")
    foreign = sorted(entry.name for entry in folder.iterdir() if entry.name not in OUTPUT_NAMES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"--out {folder} holds files that fisherlora init did not write ({shown}); the output "
                         "folder is replaced as a whole, so give a new or empty folder or a previous output")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)  # type: ignore[no-any-return]


def pick_device(device: str | None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def model_config(model_dir: str | Path) -> Any:
    """The model folder's `config.json`; `FileNotFoundError` naming the folder when it has none."""
    from transformers import AutoConfig

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    return AutoConfig.from_pretrained(folder)


def is_causal_lm(config: Any) -> bool:
    """Whether the checkpoint is a causal LM: its `architectures` name a `*ForCausalLM`/`*LMHeadModel` class."""
    return any(str(name).endswith(CAUSAL_LM_ARCHITECTURE_SUFFIXES) for name in getattr(config, "architectures", None)
               or [])


def resolve_task(model_dir: str | Path, config: Any, task: str | None) -> TaskName:
    """The task: `task` when given (a causal LM is required for "causal-lm"), else from the config."""
    if task is None:
        return "causal-lm" if is_causal_lm(config) else "seq-cls"
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "causal-lm" and not is_causal_lm(config):
        raise ValueError(
            f"model folder {model_dir} is not a causal LM: its config.json names architectures "
            f"{getattr(config, 'architectures', None)} (model_type {getattr(config, 'model_type', None)!r}); "
            f"--task causal-lm needs a checkpoint of a *{' or *'.join(CAUSAL_LM_ARCHITECTURE_SUFFIXES)} class"
        )
    return task  # type: ignore[return-value]


def is_regular_expression(value: str) -> bool:
    """Whether a --targets value is a regular expression rather than a module name (kept whole,
    commas included: they may be part of it, as in `{1,3}`)."""
    return bool(REGEX_CHARACTERS & set(value))


def parse_targets(values: list[str]) -> str | list[str]:
    """PEFT's `target_modules` from the command line: "all-linear", one regex (a string), or names (a list)."""
    if not values:
        raise ValueError("--targets needs at least one value")
    if values == [ALL_LINEAR]:
        return ALL_LINEAR
    patterns = [value for value in values if is_regular_expression(value)]
    if patterns and len(values) > 1:
        raise ValueError(f"--targets: a regular expression ({patterns[0]!r}) must be the only value")
    if patterns:
        try:
            re.compile(values[0])
        except re.error as error:
            raise ValueError(f"--targets {values[0]!r} is not a valid regular expression: {error}") from None
        return values[0]
    if ALL_LINEAR in values:
        raise ValueError(f"--targets {ALL_LINEAR} must be the only value")
    return list(values)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the modules LoRA can target in a causal LM or classifier: `nn.Linear` and transformers `Conv1D`."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear | Conv1D)]


def summarize_names(names: list[str]) -> str:
    """Names with their layer indices folded: `model.layers.<i>.mlp.up_proj (x30), lm_head`."""
    folded = Counter(re.sub(r"\.\d+\.", ".<i>.", name) for name in names)
    return ", ".join(f"{name} (x{count})" if count > 1 else name for name, count in folded.items())


def check_targets(model: nn.Module, targets: str | list[str], model_dir: str | Path) -> None:
    """Refuse targets of which any name (or the one regular expression) matches no module, naming
    it and listing the linear layers the model has.

    Each name is checked on its own: PEFT refuses only targets of which none matches, and drops a
    misspelled name beside a correct one without a word.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    linear = linear_layer_names(model)
    if targets == ALL_LINEAR:
        if not linear:
            raise ValueError(f"--targets all-linear: the model in {model_dir} has no nn.Linear or Conv1D layer")
        return
    names = [name for name, _ in model.named_modules() if name]

    def matches(target_modules: str | list[str]) -> bool:
        probe = LoraConfig(target_modules=target_modules)
        return any(LoraModel._check_target_module_exists(probe, name) for name in names)

    unmatched = ([targets] if not matches(targets) else []) if isinstance(targets, str) else [
        name for name in targets if not matches([name])]
    if not unmatched:
        return
    shown = " ".join(targets) if isinstance(targets, list) else targets
    which = "match no module" if unmatched == ([targets] if isinstance(targets, str) else targets) else (
        f"include {' '.join(unmatched)}, which {'matches' if len(unmatched) == 1 else 'match'} no module")
    raise ValueError(f"--targets {shown} {which} of the model in {model_dir}; "
                     f"its linear layers are: {summarize_names(linear)}")


def lora_model(base: Any, job: InitJob, targets: str | list[str], task_type: str) -> Any:
    """`get_peft_model` on `job.device` with the job's rank, alpha and targets; the adapter keeps the base
    layers' dtype."""
    from peft import LoraConfig, get_peft_model

    base = base.to(pick_device(job.device))
    config = LoraConfig(task_type=task_type, r=job.rank, lora_alpha=job.lora_alpha, target_modules=targets,
                        use_rslora=job.use_rslora)
    # autocast_adapter_dtype=False: PEFT would otherwise make a bfloat16 model's adapter float32.
    return get_peft_model(base, config, autocast_adapter_dtype=False)


def initialize(model: Any, batches: list[dict[str, torch.Tensor]],
               config: FisherConfig) -> tuple[FisherStats | None, list[LayerReport]]:
    """Collect statistics (when the method needs them) and initialize the adapter in place."""
    stats = collect_fisher(model, batches, config) if get_initializer(config.method).statistics_needed(config) else None
    return stats, initialize_lora_fisher(model, stats, config)


def layer_entries(reports: list[LayerReport], stats: FisherStats | None, model: Any) -> list[dict[str, Any]]:
    """Per layer: what was captured (Fisher energy), from how many tokens, at which shape and dtype."""
    from ..peft import find_target_layers
    from ..stats.layers import weight_matrix

    weights = {target.name: weight_matrix(target.weight_module, target.layer_type)
               for target in find_target_layers(model)}
    entries = []
    for report in reports:
        weight = weights[report.name]
        entries.append({
            **asdict(report),
            "shape": list(weight.shape),
            "dtype": str(weight.dtype).removeprefix("torch."),
            "tokens": stats.layers[report.name].num_tokens if stats is not None else None,
        })
    return entries


def write_outputs(out: str | Path, model: Any, tokenizer: Any, stats: FisherStats | None,
                  summary: dict[str, Any]) -> dict[str, Any]:
    """Write `adapter/` (with the record `save_as_lora(initial_adapter=...)` reads), `residual_model/`
    (when a residual was written into the base weights: not for zero-start methods nor for those that take a
    real first step), `stats.safetensors` (when statistics were collected) and `report.json` into `out`, all
    or nothing.

    Returns:
        `summary` with `outputs` (the names written) added: the content of `report.json`.
    """
    writes_residual = base_weights_changed(model)
    with staged_directory(out) as staging:
        outputs = ["adapter"]
        model.save_pretrained(str(staging / "adapter"))
        write_initial_record(model, staging / "adapter")
        if stats is not None:
            stats.save(staging / "stats.safetensors")
            outputs.append("stats.safetensors")
        if writes_residual:
            # The residual base without the LoRA wrappers: unload() restores plain modules in place.
            residual_model = model.unload()
            residual_model.save_pretrained(str(staging / "residual_model"))
            tokenizer.save_pretrained(str(staging / "residual_model"))
            outputs.append("residual_model")
        summary = {**summary, "outputs": [*outputs, "report.json"]}
        (staging / "report.json").write_text(json.dumps(summary, indent=2))
    return summary
