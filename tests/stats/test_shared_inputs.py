"""Layers that read the same tensor share one input factor `A`, and only while they do.

Every case is compared with the same layers collected one at a time (nothing to share), which
`test_collect_bruteforce.py` ties to brute-force sums.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

import fisherlora as fl
from models import pair_batches, text_batches, tiny_bert


def config(**overrides) -> fl.FisherConfig:
    return fl.FisherConfig(**{"progress": False, "num_batches": None, "collect_grad_mean": True, **overrides})


class Branches(nn.Module):
    """`left` and `right` read the same tensor, except in the batches where `split` says otherwise
    (then `right` reads a copy, or the input after an in-place change when `in_place`)."""

    def __init__(self, split: set[int], in_place: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(6, 5)
        self.left = nn.Linear(5, 4)
        self.right = nn.Linear(5, 3)
        self.head = nn.Linear(7, 3)
        self.split, self.in_place, self.calls = split, in_place, 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.stem(inputs))
        left = self.left(hidden)
        if self.calls in self.split:
            hidden = hidden.mul_(2.0) if self.in_place else hidden * 2.0
        self.calls += 1
        return self.head(torch.cat([left, self.right(hidden)], dim=-1))


def one_at_a_time(make: type | object, batches: list, names: list[str], **overrides) -> dict:
    stats = {}
    for name in names:
        model = make()
        stats[name] = fl.collect_fisher(model, batches, config(**overrides), target_modules=[name])[name]
    return stats


def assert_same(together: fl.FisherStats, alone: dict) -> None:
    for name, single in alone.items():
        for label in ("act_cov", "grad_cov", "grad_mean"):
            torch.testing.assert_close(getattr(together[name], label), getattr(single, label), rtol=1e-5,
                                       atol=1e-7, msg=f"{name} {label}")
        assert together[name].num_tokens == single.num_tokens


def test_query_key_value_share_one_input_factor() -> None:
    batches = text_batches(count=3)
    names = [f"bert.encoder.layer.{i}.attention.self.{kind}" for i in range(2) for kind in ("query", "key", "value")]
    stats = fl.collect_fisher(tiny_bert(), batches, config(), target_modules=["query", "key", "value"])
    for layer in range(2):
        query, key, value = (stats[name] for name in names[3 * layer:3 * layer + 3])
        assert query.act_cov is key.act_cov is value.act_cov
        assert query.grad_cov is not key.grad_cov
    assert stats[names[0]].act_cov is not stats[names[3]].act_cov
    assert_same(stats, one_at_a_time(tiny_bert, batches, names))


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("split", [set(), {0}, {1}, {2}])
def test_layers_share_only_while_they_read_the_same_tensor(split: set[int], in_place: bool) -> None:
    batches = pair_batches(count=3, batch_size=4)
    stats = fl.collect_fisher(Branches(split, in_place), batches, config(), target_modules=["left", "right"])
    assert (stats["left"].act_cov is stats["right"].act_cov) == (not split)
    # Collected alone, each layer only ever sees its own inputs.
    assert_same(stats, one_at_a_time(lambda: Branches(split, in_place), batches, ["left", "right"]))


def test_a_shared_factor_survives_save_and_load(tmp_path: Path) -> None:
    stats = fl.collect_fisher(tiny_bert(), text_batches(count=2), config(), target_modules=["query", "value"])
    name = "bert.encoder.layer.0.attention.self"
    assert stats[f"{name}.query"].act_cov is stats[f"{name}.value"].act_cov
    stats.save(tmp_path / "stats.safetensors")
    loaded = fl.FisherStats.load(tmp_path / "stats.safetensors")
    for layer, label in itertools.product(stats, ("act_cov", "grad_cov", "grad_mean")):
        torch.testing.assert_close(getattr(loaded[layer], label), getattr(stats[layer], label), rtol=0, atol=0)
