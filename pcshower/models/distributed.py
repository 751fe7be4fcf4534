"""Data-parallel training under ``torchrun`` and streamed training data.

``pcshower train`` started by ``torchrun --nproc-per-node N`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) runs one rank per
process: gloo on CPU, nccl on CUDA (device ``cuda:LOCAL_RANK``). Each rank streams its own part
of the Parquet row groups (:class:`pcshower.data.stream.ShowerStream`), the networks are wrapped
in ``DistributedDataParallel`` (gradients averaged over the ranks at every step, so every rank
holds the same weights), and rank 0 alone writes the log and the checkpoints. The global batch is
the config's ``batch_showers`` and ``flow_batch``, split evenly over the ranks.

Streaming (``train.stream: true``, always on with several ranks) never holds the training set:
one pass over the rank's row groups measures the normalisation sums (added over the ranks) and
each shower's shape features for the flow (a few hundred bytes a shower); the points are then
read row group by row group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pcshower.data.stream import ShowerStream, dataset_units, read_unit

__all__ = ["Ranks", "StreamData", "stream_training_data"]


@dataclass
class Ranks:
    """This process's place in a distributed run (``world == 1``: a single process)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(world, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")),
                   int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        """Join the process group: gloo on CPU; on CUDA nccl for the gradients and gloo beside it
        for the small CPU-side exchanges (normalisation sums, random states, digests), each rank
        on its own GPU."""
        if self.world > 1 and not torch.distributed.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
                torch.distributed.init_process_group("cpu:gloo,cuda:nccl")
            else:
                torch.distributed.init_process_group("gloo")

    def stop(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def device(self, device: torch.device) -> torch.device:
        """A CUDA rank's own GPU: ``cuda:LOCAL_RANK`` (a device index given on the command line
        would put every rank of a node on one GPU; choose GPUs with CUDA_VISIBLE_DEVICES)."""
        if self.world > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def add(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:meth:`ShowerModel.normalization_sums` of every rank combined (sum / min / max)."""
        if self.world == 1:
            return sums
        ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
               "max": torch.distributed.ReduceOp.MAX}
        out = {}
        for key, value in sums.items():
            value = value.clone()
            torch.distributed.all_reduce(value, op=ops[key.split("_")[0]])
            out[key] = value
        return out

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks (a copy)."""
        if self.world == 1:
            return values
        values = values.detach().clone()
        torch.distributed.all_reduce(values)
        return values / self.world

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (a list in rank order, on every rank)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def share(self, batch: int, name: str) -> int:
        """This rank's part of a global batch of ``batch`` showers (equal parts: DDP averages
        the ranks' gradients with equal weights)."""
        if batch % self.world:
            raise ValueError(f"train.{name} ({batch}) must be a multiple of the {self.world} ranks "
                             "(each rank takes an equal part of the global batch)")
        return batch // self.world


@dataclass
class StreamData:
    """What a streaming rank keeps in memory: its showers' shape features and conditions (for
    the flow), the point stream, the validation mask and the data set's fingerprint."""

    shape: object               # ShowerShape of this rank's training showers
    energy: torch.Tensor
    theta: torch.Tensor
    phi: torch.Tensor
    stream: ShowerStream
    val_mask: np.ndarray        # over the data set's global shower indices
    n_train: int                # training showers over all ranks
    n_val: int
    fingerprint: list
    particles: list
    phi_range: list

    def val_showers(self):
        """The validation showers (read again from the files)."""
        from pcshower.data.showers import Showers

        parts = []
        for unit in self.stream.units:
            ids = np.arange(unit.first, unit.first + unit.rows)
            keep = self.val_mask[ids]
            if keep.any():
                parts.append(read_unit(unit)[torch.from_numpy(np.flatnonzero(keep))])
        return Showers.concat(parts) if len(parts) > 1 else (parts[0] if parts else None)


def stream_training_data(path, model, tc: dict, ranks: Ranks, gen: torch.Generator,
                         progress: bool = False) -> StreamData:
    """One pass over this rank's row groups of ``path``: the validation split (the same
    ``val_fraction`` draw as an in-memory run, from ``gen``), the normalisation (set on ``model``,
    over all ranks), and the flow's data; returns them with the point stream."""
    from tqdm.auto import tqdm

    from pcshower.models.model import _check_physics
    from pcshower.models.showerflow import ShowerShape

    units = dataset_units(path)
    total = units[-1].first + units[-1].rows
    perm = torch.randperm(total, generator=gen)
    n_val = min(int(round(total * float(tc["val_fraction"]))), total - 1)
    val_mask = np.zeros(total, dtype=bool)
    val_mask[perm[:n_val].numpy()] = True
    stream = ShowerStream(path, ranks.share(int(tc["batch_showers"]), "batch_showers"),
                          seed=int(tc["seed"]), rank=ranks.rank, world=ranks.world,
                          buffer_showers=int(tc["stream_buffer"]), exclude=val_mask, units=units)
    mine = stream.units[ranks.rank::ranks.world]
    counts = ranks.gather(int(sum((~val_mask[u.first:u.first + u.rows]).sum() for u in mine)))
    if min(counts) == 0:  # every rank stops here alike, before the collective sums
        raise ValueError(f"{path}: rank {counts.index(0)} of {ranks.world} gets no training "
                         f"showers (its row groups hold only validation showers); use fewer ranks, "
                         "a smaller train.val_fraction, or more, smaller row groups")
    shapes, conds, sums, particles = [], [], None, set()
    for unit in tqdm(mine, disable=not (progress and ranks.main), desc="measure", unit="row group"):
        ids = np.arange(unit.first, unit.first + unit.rows)
        keep = ~val_mask[ids]
        if not keep.any():
            continue
        showers = read_unit(unit)[torch.from_numpy(np.flatnonzero(keep))]
        _check_physics(showers)
        shape = model.codec.measure_showers(showers)
        part = model.normalization_sums(showers, shape)
        sums = part if sums is None else {
            k: (v + part[k] if k.startswith("sum") else
                torch.minimum(v, part[k]) if k.startswith("min") else torch.maximum(v, part[k]))
            for k, v in sums.items()}
        shapes.append(shape)
        conds.append((showers.energy, showers.theta, showers.phi))
        particles.update(int(p) for p in showers.particle.unique().tolist())
    if sums is None:
        raise ValueError(f"rank {ranks.rank}: no training showers in its row groups of {path}")
    sums = ranks.add(sums)
    model.set_normalization(sums)
    shape = ShowerShape.concat(shapes)
    energy, theta, phi = (torch.cat([c[k] for c in conds]) for k in range(3))
    phis = ranks.gather([float(phi.min()), float(phi.max())])
    everyone = sorted(set().union(*ranks.gather(sorted(particles))))
    n_train = int(sums["sum_showers"])
    fingerprint = [total, len(units), n_val, n_train, float(sums["sum_points"]),
                   round(float(sums["sum_cond"][0]), 6)]
    return StreamData(shape, energy, theta, phi, stream, val_mask, n_train, n_val, fingerprint,
                      everyone, [min(p[0] for p in phis), max(p[1] for p in phis)])


def training_path(data) -> Path:
    """A streamed run reads files: refuse showers in memory with what to do instead."""
    if not isinstance(data, (str, os.PathLike)):
        raise ValueError("streamed (and distributed) training reads Parquet shards: pass the data "
                         "as a file or directory path, or set train.stream: false")
    return Path(data)
