"""`FisherStats` safetensors round trip, atomic writes, clear errors on foreign files; fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fisherlora as fl
from fisherlora.stats.container import FORMAT_VERSION, fingerprints_match, weight_fingerprint
from models import TinyCNN, image_batches


def synthetic_stats() -> fl.FisherStats:
    generator = torch.Generator().manual_seed(0)

    def spd(n: int) -> torch.Tensor:
        x = torch.randn(n, n + 2, generator=generator)
        return x @ x.T / (n + 2)

    with_mean = fl.LayerStats(act_cov=spd(4), grad_cov=spd(3),
                              grad_mean=torch.randn(4, 3, generator=generator).T,  # non-contiguous view
                              num_tokens=17, num_examples=5, layer_type="linear", weight_shape=(3, 4),
                              fingerprint=[0.25, 1.5, -0.125])
    without_mean = fl.LayerStats(act_cov=spd(8), grad_cov=spd(2), grad_mean=None, num_tokens=90,
                                 num_examples=10, layer_type="conv2d", weight_shape=(2, 8),
                                 fingerprint=[1.0, 2.0, 3.0])
    return fl.FisherStats(layers={"enc.layer.0.query": with_mean, "conv": without_mean}, fisher="true",
                          num_batches=3, n_samples=4, model_dtype="torch.bfloat16", world_size=2)


def assert_same(loaded: fl.FisherStats, original: fl.FisherStats) -> None:
    assert set(loaded) == set(original)
    for attribute in ("fisher", "num_batches", "n_samples", "model_dtype", "world_size"):
        assert getattr(loaded, attribute) == getattr(original, attribute), attribute
    for name, layer in original.items():
        other = loaded[name]
        assert torch.equal(other.act_cov, layer.act_cov)
        assert torch.equal(other.grad_cov, layer.grad_cov)
        if layer.grad_mean is None:
            assert other.grad_mean is None
        else:
            assert other.grad_mean is not None and torch.equal(other.grad_mean, layer.grad_mean)
        for attribute in ("num_tokens", "num_examples", "layer_type", "weight_shape", "fingerprint"):
            assert getattr(other, attribute) == getattr(layer, attribute), (name, attribute)


def test_round_trip_is_exact_and_leaves_no_temp_file(tmp_path: Path) -> None:
    stats = synthetic_stats()
    path = tmp_path / "nested" / "dir" / "stats.safetensors"  # parents are created
    stats.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.safetensors"]
    loaded = fl.FisherStats.load(path)
    assert_same(loaded, stats)
    assert loaded["enc.layer.0.query"].d_in == 4 and loaded["enc.layer.0.query"].d_out == 3
    assert len(loaded) == 2
    with pytest.raises(KeyError):
        loaded["missing"]


def test_round_trip_of_collected_statistics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    stats = fl.collect_fisher(model, image_batches(count=1), fl.FisherConfig(progress=False, collect_grad_mean=True),
                              target_modules=["conv1", "conv2", "head"])
    stats.save(str(tmp_path / "cnn.safetensors"))  # str paths work too
    loaded = fl.FisherStats.load(str(tmp_path / "cnn.safetensors"))
    assert_same(loaded, stats)
    assert loaded["conv2"].layer_type == "conv2d" and loaded["conv2"].weight_shape == (5, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.safetensors"]


def test_save_overwrites_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stats.safetensors"
    first = synthetic_stats()
    first.save(path)
    before = path.read_bytes()

    # a second save that dies half-way must leave the old file intact and no temp file behind
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def crashing_save(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crashing_save)
    second = synthetic_stats()
    second.num_batches = 99
    with pytest.raises(OSError, match="disk full"):
        second.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    second.save(path)
    assert fl.FisherStats.load(path).num_batches == 99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fl.FisherStats.load(tmp_path / "nope.safetensors")


def test_load_foreign_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no fisherlora metadata: it was not written by FisherStats.save"):
        fl.FisherStats.load(path)


def test_load_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "stats.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fl.FisherStats.load(path)


def test_load_other_format_version(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    stats = synthetic_stats()
    metadata = stats.metadata()
    assert metadata["format_version"] == FORMAT_VERSION
    metadata["format_version"] = FORMAT_VERSION + 1
    path = tmp_path / "future.safetensors"
    save_file({"conv::act_cov": torch.zeros(1)}, str(path), metadata={"fisherlora": json.dumps(metadata)})
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}, expected {FORMAT_VERSION}"):
        fl.FisherStats.load(path)


@pytest.mark.parametrize("shape", [(6, 5), (576, 576), (1536, 576), (192, 576), (576, 1536)])
def test_weight_fingerprint(shape: tuple[int, int]) -> None:
    # Real layer shapes (SmolLM2's q/k/v/o/gate/up/down): the tolerance must hold at every size.
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator) * 0.05
    reference = weight_fingerprint(weight)
    assert len(reference) == 3
    assert fingerprints_match(reference, weight_fingerprint(weight.clone()), shape)
    # dtype rounding of the same checkpoint still matches, both ways
    assert fingerprints_match(reference, weight_fingerprint(weight.bfloat16()), shape)
    assert fingerprints_match(weight_fingerprint(weight.bfloat16()), reference, shape)
    assert fingerprints_match(reference, weight_fingerprint(weight.half()), shape)
    # a different weight, a residual W - s B A, or a permutation of the rows does not
    assert not fingerprints_match(reference, weight_fingerprint(0.05 * torch.randn(*shape, generator=generator)), shape)
    rank = min(8, min(shape) - 1)
    left = torch.randn(shape[0], rank, generator=generator)
    right = torch.randn(rank, shape[1], generator=generator)
    low_rank = left @ right * (0.3 * float(weight.norm()) / float((left @ right).norm()))  # 30% of ||W||
    assert not fingerprints_match(reference, weight_fingerprint(weight - low_rank), shape)
    assert not fingerprints_match(reference, weight_fingerprint(weight.flip(0)), shape)


def test_loaded_statistics_share_the_factors_their_layers_shared(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Statistics of q/k/v (one input factor) and gate/up saved and loaded: the loaded layers share
    one tensor again, so an initializer factorizes it once, as with the collected statistics."""
    from fisherlora.init import geometry
    from fisherlora.init.registry import compute_factors
    from models import lm_batches, tiny_llama

    model = tiny_llama(vocab_size=40)
    config = fl.FisherConfig(progress=False, method="fisher_grad", num_batches=None)
    stats = fl.collect_fisher(model, lm_batches(count=2), config,
                              target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
    stats.save(tmp_path / "stats.safetensors")
    loaded = fl.FisherStats.load(tmp_path / "stats.safetensors")
    assert_same(loaded, stats)
    distinct = len({id(layer.act_cov) for layer in stats.values()})
    assert len({id(layer.act_cov) for layer in loaded.values()}) == distinct < len(stats)

    def factorizations(statistics: fl.FisherStats) -> int:
        seen: list[torch.Tensor] = []
        cholesky = geometry.cholesky_whitening
        with monkeypatch.context() as patch:
            patch.setattr(geometry, "cholesky_whitening",
                          lambda *args, **kwargs: seen.append(args[0]) or cholesky(*args, **kwargs))
            cache = geometry.FactorCache(statistics.values())
            for name, layer in statistics.items():
                compute_factors("fisher_grad", model.get_submodule(name).weight.detach(), layer, 2, 2.0, config,
                                cache=cache)
                cache.done(layer)
        return len(seen)

    assert factorizations(loaded) == factorizations(stats)
