"""Streaming training data: a PyTorch ``IterableDataset`` over Parquet shards, by row group.

A training set larger than memory is read one row group at a time. Its row groups ("units") are
shuffled at every epoch with a seed-derived generator and dealt round-robin to the ranks of a
distributed run (rank ``r`` of ``w`` reads units ``r, r + w, ...`` of that epoch's order), so
the ranks read disjoint parts and together every shower exactly once per epoch. Inside a rank,
a block shuffle mixes the showers of several units: units are read until ``buffer_showers``
showers are held, the held showers are permuted, and full batches are yielded (the remainder
stays for the next block). Everything is deterministic in (seed, rank, world size).

Global shower indices follow the files' sorted order (:func:`pcshower.io.list_shards`) and the
rows inside them; ``exclude`` (a boolean mask over them) drops showers, e.g. a validation split.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pcshower.data.showers import Showers

__all__ = ["Unit", "dataset_units", "read_unit", "ShowerStream"]


@dataclass(frozen=True)
class Unit:
    """One row group of one file: ``rows`` showers with global indices ``first ...``."""

    path: str
    row_group: int
    first: int
    rows: int


def dataset_units(path: str | os.PathLike) -> list[Unit]:
    """The row groups of a Parquet file or shard directory, in file order."""
    from pcshower.io.parquet import _check_metadata, _open, list_shards

    units, first = [], 0
    for file in list_shards(path):
        pf = _open(file)
        _check_metadata(file, pf.schema_arrow, "showers")
        for g in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            if rows:
                units.append(Unit(str(file), g, first, rows))
            first += rows
    if not units:
        raise ValueError(f"{path}: the data set holds no showers")
    return units


def read_unit(unit: Unit) -> Showers:
    """The showers of one row group."""
    from pathlib import Path

    from pcshower.io.parquet import _check_metadata, _open, read_showers_table

    path = Path(unit.path)
    pf = _open(path)
    meta = _check_metadata(path, pf.schema_arrow, "showers")
    return read_showers_table(path, pf, meta, [unit.row_group])


class ShowerStream(torch.utils.data.IterableDataset):
    """Batches ``(ids, showers)`` of ``batch_showers`` showers of one rank's part of a data set.

    Args:
        path: Parquet file or shard directory (physics or detector frame).
        batch_showers: showers per batch.
        seed: seed of the unit order and the block shuffle.
        rank, world: this process's part of a distributed run (0 and 1 alone).
        buffer_showers: showers held for the block shuffle (memory: about that many showers).
        exclude: boolean mask over the global shower indices of showers to skip.
        epochs: stop after this many epochs (the last batch may then be smaller); ``None``:
            cycle for ever (a training loop stops by its step count).
        units: the data set's units if already listed (:func:`dataset_units`).
    """

    def __init__(self, path, batch_showers: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 buffer_showers: int = 4096, exclude: np.ndarray | None = None,
                 epochs: int | None = None, units: list[Unit] | None = None):
        super().__init__()
        if batch_showers < 1 or buffer_showers < 1:
            raise ValueError(f"batch_showers and buffer_showers must be >= 1, got "
                             f"{batch_showers} and {buffer_showers}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of the {world} ranks")
        self.units = list(units) if units is not None else dataset_units(path)
        if len(self.units) < world:
            raise ValueError(f"{path} has {len(self.units)} row groups for {world} ranks: each "
                             "rank needs at least one; write the shards with smaller row groups "
                             "(pcshower.io.write_parquet(row_group_size=...)) or use fewer ranks")
        self.batch_showers, self.buffer_showers = int(batch_showers), int(buffer_showers)
        self.seed, self.rank, self.world = int(seed), int(rank), int(world)
        self.exclude = None if exclude is None else np.asarray(exclude, dtype=bool)
        self.epochs = epochs

    def epoch_units(self, epoch: int) -> list[Unit]:
        """This rank's units in the order it reads them in ``epoch``."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0]))
        order = rng.permutation(len(self.units))
        return [self.units[k] for k in order[self.rank::self.world]]

    def _read(self, unit: Unit) -> tuple[np.ndarray, Showers]:
        ids = np.arange(unit.first, unit.first + unit.rows)
        showers = read_unit(unit)
        if self.exclude is not None:
            keep = ~self.exclude[ids]
            if not keep.all():
                ids, showers = ids[keep], showers[torch.from_numpy(np.flatnonzero(keep))]
        return ids, showers

    def __iter__(self) -> Iterator[tuple[np.ndarray, Showers]]:
        held_ids: list[np.ndarray] = []
        held: list[Showers] = []
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 1, self.rank]))
            units = self.epoch_units(epoch)
            for k, unit in enumerate(units):
                ids, showers = self._read(unit)
                if len(ids):
                    held_ids.append(ids)
                    held.append(showers)
                last = k == len(units) - 1
                count = sum(len(i) for i in held_ids)
                if count >= self.buffer_showers or (last and count):
                    ids = np.concatenate(held_ids)
                    block = Showers.concat(held) if len(held) > 1 else held[0]
                    perm = rng.permutation(len(ids))
                    ids, block = ids[perm], block[torch.from_numpy(perm)]
                    full = len(ids) // self.batch_showers * self.batch_showers
                    final = last and self.epochs is not None and epoch == self.epochs - 1
                    stop = len(ids) if final else full
                    for a in range(0, stop, self.batch_showers):
                        b = min(a + self.batch_showers, stop)
                        yield ids[a:b], block[a:b]
                    held_ids = [ids[stop:]] if stop < len(ids) else []
                    held = [block[stop:]] if stop < len(ids) else []
            epoch += 1
