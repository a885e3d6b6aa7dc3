"""The method catalogue is the one place a method is added: a method registered in a test shows up
in the library's lists, the command line, the benchmark presets and the report."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

import fisherlora as fl
from fisherlora.bench.presets import PRESETS
from fisherlora.bench.roles import is_baseline, method_order
from fisherlora.cli import _fisher_config, build_parser, main
from fisherlora.init.catalog import CATALOG, MethodEntry, add_entry, remove_entry
from fisherlora.init.registry import register_initializer, run_initializer


@dataclass
class ThrowawayOptions:
    flag_prefix: ClassVar[str] = "throwaway"
    size: float = field(default=0.5, metadata={"help": "row norm of A"})


@pytest.fixture
def throwaway() -> Iterator[str]:
    name = "throwaway_zero"

    @register_initializer(name, "test-only zero-start method", family="paper", statistics=(), zero_start=True,
                          options=ThrowawayOptions)
    def initialize(weight: torch.Tensor, geometry: object, rank: int, scaling: float,
                   options: ThrowawayOptions) -> tuple[torch.Tensor, torch.Tensor]:
        lora_a = torch.full((rank, weight.shape[1]), options.size, dtype=weight.dtype)
        return lora_a, weight.new_zeros(weight.shape[0], rank)

    yield name
    remove_entry(name)


def test_a_registered_method_appears_everywhere(throwaway: str, capsys: pytest.CaptureFixture[str]):
    assert throwaway in fl.list_methods() and throwaway in fl.INITIALIZERS and fl.get_method(throwaway).zero_start
    assert main(["methods"]) == 0
    assert any(line.split()[0] == throwaway for line in capsys.readouterr().out.splitlines())
    args = build_parser().parse_args(["init", "--model", "m", "--data", "d.csv", "--text-column", "t",
                                      "--label-column", "l", "--out", "o", "--method", throwaway,
                                      "--throwaway-size", "2.0"])
    config = _fisher_config(args)
    assert config.method == throwaway and config.options == ThrowawayOptions(size=2.0)
    for name in ("quick", "text", "lm", "vision"):
        specs = PRESETS[name].specs()
        assert any(spec.method == throwaway for spec in specs), name
    # Zero start: it gets the zero-start third LR, like LoRA.
    lm = PRESETS["lm"].tasks["lm"]
    assert lm.grid(throwaway) == lm.grid("lora")
    # The report counts a "paper" method as a baseline, listed after PEFT's.
    assert is_baseline(throwaway) and method_order([throwaway, "fisher_svd", "lora"]) == ["lora", throwaway,
                                                                                            "fisher_svd"]
    weight = torch.randn(5, 4)
    result = run_initializer(throwaway, weight, None, 2, 2.0, fl.FisherConfig(method=throwaway))
    assert torch.equal(result.residual, weight) and result.lora_a.max() == 0.5


def test_option_flags_of_another_method_are_refused():
    args = build_parser().parse_args(["init", "--model", "m", "--data", "d.csv", "--out", "o",
                                      "--method", "fisher_svd", "--grad-scale", "unit"])
    with pytest.raises(ValueError, match=r"--grad-scale is an option of \['fisher_grad'\], not of --method fisher_svd"):
        _fisher_config(args)


def test_the_catalogue_refuses_inconsistent_entries():
    with pytest.raises(ValueError, match="registered twice"):
        add_entry(CATALOG["lora"])
    with pytest.raises(ValueError, match="family must be one of"):
        add_entry(MethodEntry("x", "mine", "d", build=print))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="zero-start adapter always preserves"):
        add_entry(MethodEntry("x", "paper", "d", zero_start=True, preserves_function=False, build=print))
    with pytest.raises(ValueError, match="exactly one of"):
        add_entry(MethodEntry("x", "paper", "d"))
    assert "x" not in CATALOG


def test_entries_declare_consistent_properties():
    for entry in CATALOG.values():
        assert entry.description and entry.family in ("peft", "paper", "fisher", "weight")
        assert entry.uses_data or not entry.statistics, entry.name
        assert (entry.family == "peft") == (entry.build is not None), entry.name
