"""Statistics passes written to a log file (stderr not a terminal): no bar redraws, one line per pass."""

from __future__ import annotations

import re

import pytest
from peft import LoraConfig, get_peft_model

import fisherlora as fl
from models import text_batches, tiny_bert


@pytest.mark.parametrize("layer_groups", [1, 2])
def test_each_statistics_pass_is_one_line_in_a_log(layer_groups: int, capsys: pytest.CaptureFixture[str]):
    model = get_peft_model(tiny_bert(), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    config = fl.FisherConfig(method="fisher_svd", progress=True, layer_groups=layer_groups)
    fl.collect_fisher(model, text_batches(count=3), config)  # capsys: stderr is not a terminal
    log = capsys.readouterr().err
    assert "\r" not in log, "progress-bar redraws in a log file"
    passes = re.findall(r"^Fisher statistics( \d/\d)?: 3 batches, (\d+) layers, [\d.]+ s$", log, flags=re.M)
    assert len(passes) == layer_groups == len(log.strip().splitlines()), log
    assert sum(int(layers) for _, layers in passes) == 4  # query and value of two BERT layers
