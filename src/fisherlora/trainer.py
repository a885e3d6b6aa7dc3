"""`FisherInitCallback`: a `transformers.Trainer` (or TRL `SFTTrainer`) initializes its PEFT model's
LoRA adapter from Fisher statistics when training starts, and optionally saves the adapter for
the original base when it ends: one extra argument to the trainer.

    trainer = Trainer(model=get_peft_model(base, lora_config), args=args, train_dataset=...,
                      data_collator=..., callbacks=[fl.FisherInitCallback(fl.FisherConfig(), save_to="lora/")])
    trainer.train()   # lora/ loads with PeftModel.from_pretrained(ORIGINAL base, "lora/")

The statistics are collected on the first `config.num_batches` batches of the trainer's own training
dataloader, so they see exactly what the loss sees: the collator's labels (-100 on prompt and padding
tokens) decide which tokens count. The plain functions (`collect_fisher`, `initialize_lora_fisher`,
`save_as_lora`) do the same without a trainer.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .api import collect_fisher, initialize_lora_fisher
from .config import FisherConfig
from .conversion import save_as_lora
from .init.registry import get_initializer
from .peft import LayerReport, is_peft_model
from .stats.container import FisherStats


class FisherInitCallback(TrainerCallback):
    """Initialize the trainer's LoRA adapter in the Fisher subspace at `on_train_begin`.

    Args:
        config: `FisherConfig` (method, Fisher type, `num_batches` of the training dataloader, ...).
        save_to: folder for `save_as_lora` at the end of training (an adapter for the original base);
            None saves nothing.
        adapter_name: the PEFT adapter to initialize.

    Attributes:
        reports: the `LayerReport` of every layer after initialization (empty before).
        stats: the `FisherStats` collected (None before, and for data-free methods).

    Raises (at construction):
        ValueError: an unknown method, or `rank_allocation="fisher"` (the trainer builds its optimizer
            before the callback runs, so re-created adapters would not be trained).

    Raises (at `trainer.train()`):
        TypeError: the trainer's model is not a PEFT model.
        RuntimeError: training resumes from a checkpoint: a checkpoint holds the trained adapter but
            not the residual base weights `W - s B A`, so the run cannot continue on the original
            base. Resume from a model built on the residual weights (`fisherlora init` writes them)
            without this callback.
    """

    def __init__(self, config: FisherConfig | None = None, save_to: str | None = None,
                 adapter_name: str = "default") -> None:
        self.config = config or FisherConfig()
        get_initializer(self.config.method)  # an unknown method fails here, not after the trainer is built
        if self.config.rank_allocation != "uniform":
            # The trainer builds its optimizer before on_train_begin: adapters re-created at new ranks would
            # have parameters the optimizer never sees, and would silently not train.
            raise ValueError("FisherInitCallback cannot apply rank_allocation='fisher': the trainer's optimizer "
                             "exists before the callback runs, and re-created adapters would not be trained; "
                             "initialize with fisherlora.initialize_lora_fisher (or fisherlora init) before "
                             "building the trainer")
        self.save_to = save_to
        self.adapter_name = adapter_name
        self.reports: list[LayerReport] = []
        self.stats: FisherStats | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if model is None or not is_peft_model(model):
            raise TypeError(f"FisherInitCallback needs the trainer's model to be a PeftModel, got "
                            f"{type(model).__name__}")
        if state.global_step > 0:
            raise RuntimeError(
                f"FisherInitCallback: training resumes at step {state.global_step}, but a checkpoint holds the "
                "adapter, not the residual base weights; resume without this callback on a model built from the "
                "residual weights (fisherlora init writes them to OUT/residual_model)"
            )
        if get_initializer(self.config.method).statistics_needed(self.config):
            if train_dataloader is None:
                raise RuntimeError("FisherInitCallback: the trainer passed no train_dataloader to collect "
                                   "statistics on")
            self.stats = collect_fisher(model, train_dataloader, self.config, adapter_name=self.adapter_name)
        self.reports = initialize_lora_fisher(model, self.stats, self.config, adapter_name=self.adapter_name)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.save_to is not None and args.process_index == 0:
            save_as_lora(model, self.save_to, adapter_name=self.adapter_name)
