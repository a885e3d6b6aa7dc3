"""The arithmetic of `bench-init`'s arithmetic ratios: the probe plus `count_work` equal the multiply-adds the
statistics code itself performs (counted by wrapping its sums), and the forward's as torch counts it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fisherlora.bench.work_count import LayerRows, StatisticsWork, count_work, factor_work
from fisherlora.bench.work_probe import probe_rows
from fisherlora.config import FisherConfig
from fisherlora.peft import find_target_layers
from fisherlora.stats import accumulators, sketch
from fisherlora.stats.collect import collect_statistics
from models import TinyCNN, image_batches, lm_batches, text_batches, tiny_bert, tiny_llama

BERT_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense", "pooler.dense"]
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _cases():
    return {
        "bert": (lambda: tiny_bert(), BERT_LINEAR, lambda: text_batches(count=3, batch_size=4, length=7)),
        "llama": (lambda: tiny_llama(40), LLAMA_LINEAR, lambda: lm_batches(count=3, batch_size=3, length=8)),
        "cnn": (lambda: TinyCNN(), ["conv1", "conv2", "head"], lambda: image_batches(count=2, batch_size=3)),
    }


class CodeCount:
    """Multiply-adds of the statistics code's own sums, by wrapping them: a dense sum `N d(d+1)/2`,
    a sketch `2 N d k`, `M` `d_in d_out` per row it adds (the code's own nonzero-row selection)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.factors = 0
        self.grad_mean = 0
        dense_add, sketch_add = accumulators.DenseSum.add, sketch.NystromSketch.add
        gradients_add = accumulators.LayerAccumulator.add_output_gradients

        def dense(sum_: accumulators.DenseSum, rows: torch.Tensor) -> None:
            dim = sum_.total.shape[0]
            self.factors += rows.shape[0] * dim * (dim + 1) // 2
            dense_add(sum_, rows)

        def sketched(sum_: sketch.NystromSketch, rows: torch.Tensor) -> None:
            self.factors += 2 * rows.shape[0] * sum_.dim * sum_.rank
            sketch_add(sum_, rows)

        def gradients(accumulator: accumulators.LayerAccumulator, rows, kept_rows, kept_tokens, inputs, examples,
                      batch_index) -> None:
            if accumulator.grad_mean_sum is not None and rows is not None:
                live = accumulators.nonzero_row_index(rows)
                count = rows.shape[0] if live is None else live.shape[0]
                self.grad_mean += count * accumulator.grad_mean_sum.numel()
            gradients_add(accumulator, rows, kept_rows, kept_tokens, inputs, examples, batch_index)

        monkeypatch.setattr(accumulators.DenseSum, "add", dense)
        monkeypatch.setattr(sketch.NystromSketch, "add", sketched)
        monkeypatch.setattr(accumulators.LayerAccumulator, "add_output_gradients", gradients)


def _forward_macs(model: torch.nn.Module, targets, batches) -> int:
    """Multiply-adds of the targeted layers in one forward over `batches`, as torch's flop counter sees them."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"}) if isinstance(batch, dict) else model(batch[0])
    counts = counter.get_flop_counts()
    prefix = type(model).__name__
    return sum(sum(counts[f"{prefix}.{target.name}"].values()) for target in targets) // 2


SETTINGS = {
    "dense": (FisherConfig(progress=False), False),
    "with M": (FisherConfig(progress=False), True),
    "sketched": (FisherConfig(progress=False, sketch_threshold=16, sketch_rank=4), True),
    "true Fisher, 2 draws": (FisherConfig(progress=False, fisher="true", n_samples=2), True),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("case", ["bert", "llama", "cnn"])
def test_the_count_is_what_the_statistics_code_does(case: str, setting: str, monkeypatch: pytest.MonkeyPatch):
    make_model, names, make_batches = _cases()[case]
    config, with_grad_mean = SETTINGS[setting]
    if case == "llama" and config.fisher == "true":
        # A query's gradient at a sequence's first position is zero in exact arithmetic (it attends to itself
        # alone) and in floating point zero or ~1e-8 depending on the CPU's kernels and the labels: the
        # probe's empirical pass cannot predict whether the label draws' passes drop that row (on an
        # AVX-512 machine they kept 2 of them), so the true-Fisher count is compared without q_proj.
        names = [name for name in names if name != "q_proj"]
    model, batches = make_model(), make_batches()
    targets = find_target_layers(model, target_modules=names)
    probed = probe_rows(model, targets, batches)
    work = count_work(probed.layers, StatisticsWork(with_grad_mean, config.sketch_threshold, config.sketch_rank,
                                                    config.n_samples if config.fisher == "true" else 1))
    code = CodeCount(monkeypatch)
    collect_statistics(model, targets, batches, replace(config, num_batches=None), with_grad_mean=with_grad_mean)
    assert round(work.factors * probed.tokens) == code.factors > 0
    assert round(work.grad_mean * probed.tokens) == code.grad_mean and (code.grad_mean > 0) == with_grad_mean
    assert round(work.forward * probed.tokens) == _forward_macs(model, targets, batches)
    draws = 2 if config.fisher == "true" else 1
    assert work.statistics == pytest.approx((1 + draws) * work.forward + work.factors + work.grad_mean)
    assert work.lora_ga == pytest.approx(3 * work.forward) and work.floor == pytest.approx(2 * work.forward)


def test_query_key_value_and_gate_up_read_one_input():
    bert = probe_rows(tiny := tiny_bert(), find_target_layers(tiny, target_modules=BERT_LINEAR), text_batches())
    groups = {layer.name: layer.input_group for layer in bert.layers}
    block = "bert.encoder.layer.0."
    assert groups[block + "attention.self.query"] == groups[block + "attention.self.key"] \
        == groups[block + "attention.self.value"] is not None
    others = [block + name for name in ("attention.output.dense", "intermediate.dense", "output.dense")]
    assert len({groups[block + "attention.self.query"], *(groups[name] for name in others)}) == 4
    assert groups["bert.encoder.layer.1.attention.self.query"] != groups[block + "attention.self.query"]
    llama = probe_rows(tiny := tiny_llama(40), find_target_layers(tiny, target_modules=LLAMA_LINEAR), lm_batches())
    groups = {layer.name: layer.input_group for layer in llama.layers}
    block = "model.layers.0."
    assert groups[block + "mlp.gate_proj"] == groups[block + "mlp.up_proj"] != groups[block + "mlp.down_proj"]
    assert groups[block + "self_attn.q_proj"] == groups[block + "self_attn.v_proj"] != groups[block + "mlp.up_proj"]
    # The output layer is not targeted: its forward is reported apart (vocabulary 40 x hidden 16 per token).
    assert llama.untargeted_forward == sum(batch["input_ids"].numel() for batch in lm_batches()) * 40 * 16


def test_the_pooler_counts_one_row_per_example_and_the_padding_only_in_the_passes():
    batches = text_batches(count=2, batch_size=4, length=7)
    bert = probe_rows(tiny := tiny_bert(), find_target_layers(tiny, target_modules=BERT_LINEAR), batches)
    layers = {layer.name: layer for layer in bert.layers}
    attended = sum(int(batch["attention_mask"].sum()) for batch in batches)
    assert bert.tokens == 2 * 4 * 7 and layers["bert.pooler.dense"].rows == 2 * 4
    query = layers["bert.encoder.layer.0.attention.self.query"]
    assert query.rows == bert.tokens and query.act_rows == query.grad_rows == query.grad_mean_rows == attended
    # In the last block only the pooled position reaches the loss after attention: one row per example.
    assert layers["bert.encoder.layer.1.output.dense"].grad_rows == 2 * 4


def _layers() -> list[LayerRows]:
    return [LayerRows("q", 8, 8, 10, 9, 7, 8, input_group=0), LayerRows("k", 4, 8, 10, 9, 6, 8, input_group=0),
            LayerRows("up", 32, 8, 10, 9, 7, 8), LayerRows("down", 8, 32, 10, 9, 7, 8)]


def test_the_grad_mean_adds_one_weight_gradient_over_its_rows():
    layers = _layers()
    without, with_m = count_work(layers, StatisticsWork()), count_work(layers, StatisticsWork(with_grad_mean=True))
    assert with_m.statistics - without.statistics == pytest.approx(with_m.grad_mean)
    assert with_m.grad_mean * 10 == sum(layer.grad_mean_rows * layer.d_in * layer.d_out for layer in layers)
    full = [replace(layer, grad_mean_rows=layer.rows) for layer in layers]
    assert count_work(full, StatisticsWork(with_grad_mean=True)).grad_mean == pytest.approx(without.forward)


def test_sketching_costs_two_products_of_d_k_per_row_and_shares_nothing():
    layers = _layers()
    dense = count_work(layers, StatisticsWork())
    # A shared by q and k counted once; G per layer; up's G (32) and down's A (32) too.
    expected_dense = 9 * 36 + 9 * 36 + 9 * 528 + 7 * 36 + 6 * 10 + 7 * 528 + 7 * 36
    assert dense.factors * 10 == expected_dense
    sketched = count_work(layers, StatisticsWork(sketch_threshold=16, sketch_rank=4))
    assert sketched.factors * 10 == expected_dense - (9 + 7) * (528 - 2 * 32 * 4)
    assert factor_work(32, 16, 4) == 256 and factor_work(16, 16, 4) == 136 and factor_work(32, None, 4) == 528
    # Every factor sketched: the shared A is no longer shared (each sketch has its own test matrix).
    all_sketched = count_work(layers, StatisticsWork(sketch_threshold=2, sketch_rank=2))
    assert all_sketched.factors * 10 == sum(9 * 2 * layer.d_in * 2 + layer.grad_rows * 2 * layer.d_out * 2
                                            for layer in layers)
    assert sketched.arithmetic_to_lora_ga == pytest.approx(sketched.statistics / (3 * dense.forward))


def test_bad_counts_are_refused_naming_the_layer():
    with pytest.raises(ValueError, match="'q'.*rows=10"):
        count_work([LayerRows("q", 8, 8, 10, 11, 7, 8)], StatisticsWork())
    with pytest.raises(ValueError, match="'q' and 'k' share input group 0"):
        count_work([LayerRows("q", 8, 8, 10, 9, 7, 8, 0), LayerRows("k", 4, 6, 10, 9, 6, 8, 0)], StatisticsWork())
    with pytest.raises(ValueError, match="no targeted layer"):
        count_work([], StatisticsWork())
