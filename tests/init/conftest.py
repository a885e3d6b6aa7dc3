"""Statistics shared by the float64 reference tests of the initializers."""

from __future__ import annotations

import pytest
import torch

import fisherlora as fl
from models import lm_batches

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def wide_llama():
    """A one-layer Llama whose targets have every shape (square, wide: k/v, down; tall: gate/up) and
    share input factors (q/k/v, gate/up). Too narrow for the block Krylov solver: the reference tests
    reach that with random statistics 300-420 wide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama_stats() -> tuple[torch.nn.Module, fl.FisherStats]:
    model = wide_llama()
    batches = lm_batches(count=4, batch_size=6, length=12, vocab=40)
    config = fl.FisherConfig(progress=False, collect_grad_mean=True, num_batches=None)
    return model, fl.collect_fisher(model, batches, config, target_modules=LLAMA_TARGETS)
