"""fisherlora: LoRA initialization in the Fisher subspace of the downstream data, PEFT-native.

    import fisherlora as fl
    stats = fl.collect_fisher(peft_model, dataloader, fl.FisherConfig())
    fl.initialize_lora_fisher(peft_model, stats, fl.FisherConfig(method="fisher_svd"))
    fl.save_as_lora(peft_model, "adapter/")

With a `transformers.Trainer`: `callbacks=[fl.FisherInitCallback(fl.FisherConfig(), save_to="adapter/")]`.
"""

from typing import TYPE_CHECKING

from .api import collect_fisher, initialize_lora_fisher
from .config import CollectionConfig, FisherConfig
from .conversion import save_as_lora
from .init.catalog import CATALOG, MethodEntry, get_method
from .init.fisher import FisherEigOptions, FisherGradOptions
from .init.registry import INITIALIZERS, register_initializer
from .methods import METHODS, PEFT_BASELINES, list_methods
from .peft import LayerReport
from .stats.collect import StatisticsError
from .stats.container import FisherStats, LayerStats
from .stats.sketch import LowRankFactor

if TYPE_CHECKING:
    from .trainer import FisherInitCallback

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # FisherInitCallback subclasses transformers.TrainerCallback: imported on first use, so that
    # `import fisherlora` does not import transformers.
    if name == "FisherInitCallback":
        from .trainer import FisherInitCallback

        return FisherInitCallback
    raise AttributeError(f"module 'fisherlora' has no attribute {name!r}")


__all__ = [
    "CATALOG",
    "CollectionConfig",
    "FisherEigOptions",
    "FisherGradOptions",
    "INITIALIZERS",
    "MethodEntry",
    "get_method",
    "METHODS",
    "PEFT_BASELINES",
    "FisherConfig",
    "FisherInitCallback",
    "FisherStats",
    "LayerReport",
    "LayerStats",
    "LowRankFactor",
    "StatisticsError",
    "collect_fisher",
    "initialize_lora_fisher",
    "list_methods",
    "register_initializer",
    "save_as_lora",
]
