r"""EPiC layers: equivariant point-cloud blocks that exchange information through a global vector.

Buhmann, Kasieczka, Thaler, "EPiC-GAN: Equivariant Point Cloud Generation for Particle Jets",
SciPost Phys. 15, 130 (2023), arXiv:2301.08128, section 3 (also the backbone of CaloClouds II,
arXiv:2309.05704). One layer updates the global vector :math:`g` of each shower from pooled
point features, then every point :math:`p_i` from :math:`g`:

.. math::

    g' = g + \phi^g\big(g,\ \tfrac{1}{N}\textstyle\sum_i p_i,\ \tfrac{1}{N_\mathrm{ref}}\sum_i p_i,\ c\big)
    \qquad
    p_i' = p_i + \phi^p\big(p_i,\ g',\ c\big)

with :math:`c` the conditioning vector (incident energy, angles, diffusion time) and
:math:`\phi^g, \phi^p` two-layer MLPs with leaky ReLU. Mean and sum pooling together let the
network see both the shape and the size of a cloud. The layer is permutation equivariant in the
points and works on the flat ragged batch: no padding.
"""

from __future__ import annotations

import torch
from torch import nn

from pcshower.nn.pooling import segment_mean, segment_sum

__all__ = ["EPiCLayer", "EPiCNetwork"]

#: The fewest rows of a chunk of :meth:`EPiCNetwork.forward` (chunk_points): matrix products of
#: very few rows take other kernels (GEMV-like), whose sums round differently.
_MIN_CHUNK = 256


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, hidden),
                         nn.LeakyReLU(0.01), nn.Linear(hidden, out))


class EPiCLayer(nn.Module):
    """One EPiC block: pooled points → global vector, global vector → points (both residual).

    Args:
        point_dim: width of the per-point features.
        global_dim: width of the per-shower global vector.
        cond_dim: width of the per-shower conditioning vector.
        hidden: hidden width of both MLPs.
        sum_scale: :math:`N_\\mathrm{ref}`, divides the sum pooling to keep it O(1).
    """

    def __init__(self, point_dim: int, global_dim: int, cond_dim: int, hidden: int,
                 sum_scale: float = 100.0):
        super().__init__()
        self.sum_scale = float(sum_scale)
        self.global_mlp = _mlp(global_dim + 2 * point_dim + cond_dim, hidden, global_dim)
        self.point_mlp = _mlp(point_dim + global_dim + cond_dim, hidden, point_dim)

    def forward(self, points: torch.Tensor, glob: torch.Tensor, cond: torch.Tensor,
                batch: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``points [P, point_dim]``, ``glob [B, global_dim]``, ``cond [B, cond_dim]``,
        ``batch [P]`` shower index of each point, ``counts [B]`` points per shower."""
        b = glob.shape[0]
        total = segment_sum(points, batch, b)
        mean = total / counts.clamp(min=1).to(points.dtype).unsqueeze(-1)
        glob = glob + self.global_mlp(torch.cat([glob, mean, total / self.sum_scale, cond], -1))
        per_point = torch.cat([glob, cond], -1)[batch]
        points = points + self.point_mlp(torch.cat([points, per_point], -1))
        return points, glob


class EPiCNetwork(nn.Module):
    """A stack of :class:`EPiCLayer` mapping per-point inputs to per-point outputs.

    Input points ``[P, in_dim]`` are embedded to ``point_dim``, the global vector starts as the
    mean-pooled embedding, and the last point features are projected to ``out_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int, *, point_dim: int = 64,
                 global_dim: int = 16, hidden: int = 128, layers: int = 4,
                 sum_scale: float = 100.0):
        super().__init__()
        self.embed = nn.Linear(in_dim + cond_dim, point_dim)
        self.global_init = nn.Linear(point_dim + cond_dim, global_dim)
        self.layers = nn.ModuleList(EPiCLayer(point_dim, global_dim, cond_dim, hidden, sum_scale)
                                    for _ in range(layers))
        self.head = nn.Linear(point_dim + global_dim + cond_dim, out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, batch: torch.Tensor,
                counts: torch.Tensor | None = None, chunk_points: int | None = None
                ) -> torch.Tensor:
        """``x [P, in_dim]``, ``cond [B, cond_dim]``, ``batch [P]``, ``counts [B]``.

        ``chunk_points`` (without autograd): the per-point layers run on chunks of that many
        points, written in place into one buffer, so that their temporaries stay small enough
        for the allocator to reuse (a whole large batch's are mapped and faulted in afresh by
        every op). The per-shower reductions and global MLPs still see all showers at once, so
        the result is the one-pass result bit for bit (matrix products of 4 rows or more are
        row-for-row the same whatever the number of rows: chunks never have fewer).
        """
        b = cond.shape[0]
        if counts is None:
            counts = torch.bincount(batch, minlength=b)
        if chunk_points is not None and not torch.is_grad_enabled() \
                and x.shape[0] > chunk_points:
            return self._forward_chunked(x, cond, batch, counts, int(chunk_points))
        points = torch.nn.functional.leaky_relu(self.embed(torch.cat([x, cond[batch]], -1)), 0.01)
        glob = self.global_init(torch.cat([segment_mean(points, batch, b, counts), cond], -1))
        for layer in self.layers:
            points, glob = layer(points, glob, cond, batch, counts)
        return self.head(torch.cat([points, glob[batch], cond[batch]], -1))

    def _forward_chunked(self, x, cond, batch, counts, chunk: int) -> torch.Tensor:
        b, total = cond.shape[0], x.shape[0]
        step = max(chunk, _MIN_CHUNK)
        cuts = list(range(0, total, step))
        if total - cuts[-1] < _MIN_CHUNK and len(cuts) > 1:  # no short last chunk
            cuts.pop()
        spans = list(zip(cuts, cuts[1:] + [total]))
        points = None
        for a, z in spans:
            part = torch.nn.functional.leaky_relu(
                self.embed(torch.cat([x[a:z], cond[batch[a:z]]], -1)), 0.01)
            if points is None:  # the activations' dtype (bf16 under autocast), as in one pass
                points = part.new_empty((total, part.shape[1]))
            points[a:z] = part
        glob = self.global_init(torch.cat([segment_mean(points, batch, b, counts), cond], -1))
        for layer in self.layers:
            total_p = segment_sum(points, batch, b)
            mean = total_p / counts.clamp(min=1).to(points.dtype).unsqueeze(-1)
            glob = glob + layer.global_mlp(torch.cat([glob, mean, total_p / layer.sum_scale,
                                                      cond], -1))
            per_shower = torch.cat([glob, cond], -1)
            for a, z in spans:
                points[a:z] += layer.point_mlp(torch.cat([points[a:z], per_shower[batch[a:z]]],
                                                         -1))
        out = None
        per_shower = torch.cat([glob, cond], -1)
        for a, z in spans:
            part = self.head(torch.cat([points[a:z], per_shower[batch[a:z]]], -1))
            if out is None:
                out = part.new_empty((total, part.shape[1]))
            out[a:z] = part
        return out
