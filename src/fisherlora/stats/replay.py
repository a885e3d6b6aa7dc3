"""Several passes over one dataloader that all see the batches of the first pass, or an error.

`FisherConfig.layer_groups > 1` iterates the dataloader once per group of layers. A shuffling
`DataLoader` draws its order (and its workers' seeds) from its generator or from torch's global
RNG, and random augmentations draw from the global RNGs of torch, Python and NumPy; each of those
has moved on after the first pass. `SamePasses` snapshots every one of them before the first pass
and restores the snapshot before each later pass, so a later pass replays the first; it then checks
that it did, by a hash of every batch, and raises `StatisticsError` naming the pass and the batch
when it did not (a private RNG, persistent workers, a dataset that changes). After the
collection the RNGs are left as the first pass left them, as if the data had been read once.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import StatisticsError


def batch_fingerprint(batch: Any) -> str:
    """A hash of the batch's contents: tensors by dtype, shape and bytes, other values by `repr`."""
    digest = hashlib.blake2b(digest_size=16)

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            for key, item in value.items():
                digest.update(repr(key).encode())
                visit(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__}{len(value)}".encode())
            for item in value:
                visit(item)
        else:
            digest.update(repr(value).encode())

    visit(batch)
    return digest.hexdigest()


def _loader_generators(dataloader: Any) -> list[torch.Generator]:
    """The `torch.Generator`s a `DataLoader` and its (batch) sampler draw their order from."""
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    owners = [dataloader, getattr(dataloader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)]
    found: dict[int, torch.Generator] = {}
    for owner in owners:
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator):
            found[id(generator)] = generator
    return list(found.values())


@dataclass
class RandomState:
    """Snapshot of the dataloader's generators and of the global torch/CUDA, Python and NumPy RNGs."""

    generators: list[tuple[torch.Generator, torch.Tensor]]
    torch_state: torch.Tensor
    cuda_states: list[torch.Tensor] | None
    python_state: Any
    numpy_state: Any

    @classmethod
    def capture(cls, dataloader: Any) -> RandomState:
        numpy = sys.modules.get("numpy")
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        return cls(
            generators=[(generator, generator.get_state()) for generator in _loader_generators(dataloader)],
            torch_state=torch.get_rng_state(),
            cuda_states=torch.cuda.get_rng_state_all() if cuda else None,
            python_state=random.getstate(),
            numpy_state=numpy.random.get_state() if numpy is not None else None,
        )

    def restore(self) -> None:
        for generator, state in self.generators:
            generator.set_state(state)
        torch.set_rng_state(self.torch_state)
        if self.cuda_states is not None:
            torch.cuda.set_rng_state_all(self.cuda_states)
        random.setstate(self.python_state)
        numpy = sys.modules.get("numpy")
        if numpy is not None and self.numpy_state is not None:
            numpy.random.set_state(self.numpy_state)


class SamePasses:
    """Iterates the first `num_batches` batches of `dataloader` (all for None) once per `iter()`;
    every iteration after the first replays the first one's RNG states and must yield its batches.

    Call `finish()` after the last pass to leave the RNGs as the first pass left them.
    """

    def __init__(self, dataloader: Iterable[Any], num_batches: int | None, groups: int) -> None:
        self.dataloader = dataloader
        self.num_batches = num_batches
        self.groups = groups
        self.fingerprints: list[str] = []
        self.passes = 0
        self.start: RandomState | None = None
        self.after_first: RandomState | None = None

    def __len__(self) -> int:
        total = len(self.dataloader)  # type: ignore[arg-type]  # TypeError when it has none, like any iterable
        return total if self.num_batches is None else min(total, self.num_batches)

    def __iter__(self) -> Iterator[Any]:
        if self.start is None:
            self.start = RandomState.capture(self.dataloader)
        else:
            self.start.restore()
        self.passes += 1
        return self._batches(self.passes)

    def _batches(self, pass_number: int) -> Iterator[Any]:
        index = -1
        for index, batch in enumerate(itertools.islice(self.dataloader, self.num_batches)):
            fingerprint = batch_fingerprint(batch)
            if pass_number == 1:
                self.fingerprints.append(fingerprint)
            elif index >= len(self.fingerprints) or fingerprint != self.fingerprints[index]:
                raise self._mismatch(pass_number, f"gave a batch {index} that differs from pass 1's batch {index}")
            yield batch
        if pass_number == 1:
            self.after_first = RandomState.capture(self.dataloader)
        elif index + 1 != len(self.fingerprints):
            raise self._mismatch(pass_number, f"gave {index + 1} batches where pass 1 gave {len(self.fingerprints)}")

    def _mismatch(self, pass_number: int, what: str) -> StatisticsError:
        return StatisticsError(
            f"FisherConfig.layer_groups={self.groups} reads the dataloader once per group, and pass {pass_number} "
            f"over the dataloader {what} (a random augmentation or sampler with its own RNG, persistent workers, or "
            "data that changes); make every pass yield the same batches (e.g. pass a list of batches) or set "
            "layer_groups=1"
        )

    def finish(self) -> None:
        """Leave the RNGs as after the first pass (the data looks read once)."""
        if self.after_first is not None:
            self.after_first.restore()
