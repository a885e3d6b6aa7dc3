"""`save_as_lora`: the trained adapter as a plain LoRA adapter for the ORIGINAL base weights, and the record
that lets another process convert it."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import staged_directory
from .peft import (
    PEFT_PREFIX,
    InitialFactors,
    _as_any,
    _initial_factors,
    base_weights_changed,
    find_target_layers,
    is_peft_model,
    unwrap_compiled,
)

# Written next to an adapter saved right after initialization (`write_initial_record`): whether the base weights
# hold a residual, so that `save_as_lora(initial_adapter=...)` in another process converts it the right way.
INITIAL_RECORD = "fisherlora_initial.json"


def write_initial_record(model: nn.Module, folder: str | os.PathLike[str], adapter_name: str = "default") -> None:
    """Record, in an adapter folder saved right after initialization, whether the base weights hold a residual
    (`INITIAL_RECORD`), so that `save_as_lora(initial_adapter=folder)` in another process subtracts the
    initial product only when it was subtracted."""
    record = {"residual_written": base_weights_changed(model, adapter_name)}
    (Path(folder) / INITIAL_RECORD).write_text(json.dumps(record, indent=2))


def _converted_config(peft_config: Any) -> Any:
    # The converted adapter has rank 2r and scaling 1 (s is folded into B), for every layer.
    config = copy.deepcopy(peft_config)
    rank_pattern = dict(config.rank_pattern or {})
    alpha_pattern = dict(config.alpha_pattern or {})
    config.r = 2 * peft_config.r
    config.lora_alpha = 2 * peft_config.r
    config.use_rslora = False
    config.rank_pattern = {key: 2 * value for key, value in rank_pattern.items()}
    config.alpha_pattern = {key: 2 * rank_pattern.get(key, peft_config.r) for key in {*rank_pattern, *alpha_pattern}}
    config.init_lora_weights = True
    return config


def read_initial_factors(model: nn.Module, initial_adapter: str | os.PathLike[str],
                         adapter_name: str = "default") -> InitialFactors:
    """Initial `A0, B0` of every LoRA layer from an adapter folder saved right after initialization.

    Args:
        model: the PEFT model being converted (gives the layer names and scalings).
        initial_adapter: folder with `adapter_model.safetensors` written by `model.save_pretrained`
            (or `fisherlora init`) before training. When it holds the record written by
            `write_initial_record` (`fisherlora init` writes it) saying that no residual was written
            (a method that takes a real first step), `B0` is returned as zero; without the record the
            initial product is taken to have been subtracted from the base weights.

    Returns:
        base-model layer name -> `(A0 (r, ...), B0 (d_out, r, ...), s)`.
    """
    from safetensors.torch import load_file

    path = Path(initial_adapter) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"initial adapter {path} does not exist")
    tensors = load_file(str(path))
    record_path = Path(initial_adapter) / INITIAL_RECORD
    residual_written = json.loads(record_path.read_text()).get("residual_written", True) if record_path.is_file() \
        else True
    factors = {}
    for target in find_target_layers(model, adapter_name):
        layer: Any = target.hook_module
        key = f"{PEFT_PREFIX}{target.name}"
        if f"{key}.lora_A.weight" not in tensors:
            raise ValueError(f"initial adapter {path} has no factors for module {target.name!r}")
        initial_b = tensors[f"{key}.lora_B.weight"].float()
        factors[target.name] = (tensors[f"{key}.lora_A.weight"].float(),
                                initial_b if residual_written else torch.zeros_like(initial_b),
                                float(layer.scaling[adapter_name]))
    return factors


def save_as_lora(model: nn.Module, out_dir: str | os.PathLike[str], adapter_name: str = "default",
                 initial_adapter: str | os.PathLike[str] | None = None) -> Path:
    """Write an adapter that loads onto the ORIGINAL base with `PeftModel.from_pretrained`.

    The model's base weights hold `W - s B0 A0`; its adapter holds trained `A1, B1`. Since
    `W - s B0 A0 + s B1 A1 = W + [s B1, -s B0] [A1; A0]`, the saved adapter has rank `2r`,
    scaling 1, `A = [A1; A0]`, `B = [s B1, -s B0]` (the conversion PEFT applies to
    PiSSA/CorDA/LoRA-GA); ranks set per layer (`rank_pattern`, e.g. by Fisher rank allocation) double
    per layer. For a method that wrote no residual (a zero start, or a real first step: `fisher_step`,
    LoRA-One, LoRA-DA) nothing was subtracted, `B0` counts as zero and the trained model is
    `W + s B1 A1`: already a plain LoRA adapter for the original base, saved as it is (rank and scaling
    unchanged). With `lora_bias=True` the bias `b` of `lora_B` starts at zero and the trained model adds
    `s b`, so the converted bias is `s b` (scaling 1). `modules_to_save` (e.g. a classifier head) are
    saved as PEFT does. A `torch.compile`d model and the model inside it convert alike.
    The folder is written to a temporary sibling and renamed into place. The initial factors are
    remembered by `initialize_lora_fisher` in this process; in another process pass
    `initial_adapter`, the adapter folder saved right after initialization.

    Returns:
        the output folder.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    model = unwrap_compiled(model)
    if not is_peft_model(model):
        raise TypeError(f"save_as_lora needs a PeftModel, got {type(model).__name__}")
    if initial_adapter is not None:
        initial = read_initial_factors(model, initial_adapter, adapter_name)
    else:
        initial = _initial_factors(model, adapter_name)
    peft_config = _as_any(model).peft_config[adapter_name]
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    targets = {target.name: target for target in find_target_layers(model, adapter_name)}
    # Nothing subtracted anywhere (a zero start, or a real first step): the trained model is W + s B1 A1,
    # already a plain LoRA adapter for the original base, saved as it is.
    residual = any(bool(initial_b.any()) for _, initial_b, _ in initial.values())
    for name, (initial_a, initial_b, scaling) in initial.items():
        key = f"{PEFT_PREFIX}{name}"
        if f"{key}.lora_A.weight" not in state:
            raise RuntimeError(f"PEFT's state dict has no entry {key}.lora_A.weight; cannot convert {name!r}")
        # PEFT saves the base weight of a target named like an embedding (`lm_head`, `embed_tokens`): here
        # possibly the residual, which must not overwrite the original base's weight on loading.
        state.pop(f"{key}.base_layer.weight", None)
        if residual:
            _convert_layer(state, key, targets[name].hook_module, adapter_name, initial_a, initial_b, scaling)
    config = _converted_config(peft_config) if residual else copy.deepcopy(peft_config)
    with staged_directory(out_dir) as staging:
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(str(staging))
        (staging / "fisherlora.json").write_text(json.dumps({"converted_from_rank": peft_config.r,
                                                             "residual_written": residual,
                                                             "layers": sorted(initial)}, indent=2))
    return Path(out_dir)


def _convert_layer(state: dict[str, torch.Tensor], key: str, layer: Any, adapter_name: str, initial_a: torch.Tensor,
                   initial_b: torch.Tensor, scaling: float) -> None:
    """One layer's entries of `state` become `A = [A1; A0]`, `B = [s B1, -s B0]`, bias `s b1`."""
    trained_a = layer.lora_A[adapter_name].weight.detach().float().cpu()
    trained_b = layer.lora_B[adapter_name].weight.detach().float().cpu()
    dtype = state[f"{key}.lora_A.weight"].dtype
    state[f"{key}.lora_A.weight"] = torch.cat([trained_a, initial_a], dim=0).to(dtype).contiguous()
    converted_b = torch.cat([scaling * trained_b, -scaling * initial_b], dim=1)
    state[f"{key}.lora_B.weight"] = converted_b.to(dtype).contiguous()
    if f"{key}.lora_B.bias" in state:
        # Initialization refuses an adapter not at zero, so the initial bias was 0: s * (b1 - 0).
        trained_bias = layer.lora_B[adapter_name].bias.detach().float().cpu()
        state[f"{key}.lora_B.bias"] = (scaling * trained_bias).to(dtype).contiguous()
