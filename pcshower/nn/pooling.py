"""Per-shower reductions over flat point tensors (the ragged batch's ``batch`` index vector).

Pure torch (``index_add_``), so torch-scatter is never needed; gradients flow through both.
"""

from __future__ import annotations

import torch

__all__ = ["segment_sum", "segment_mean"]


def segment_sum(values: torch.Tensor, batch: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``out[b] = sum_{i: batch[i] = b} values[i]`` for ``values [P, C]`` → ``[B, C]``."""
    out = values.new_zeros((num_segments, *values.shape[1:]))
    return out.index_add_(0, batch, values)


def segment_mean(values: torch.Tensor, batch: torch.Tensor, num_segments: int,
                 counts: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` per segment; empty segments give 0."""
    if counts is None:
        counts = torch.bincount(batch, minlength=num_segments)
    total = segment_sum(values, batch, num_segments)
    return total / counts.clamp(min=1).to(values.dtype).unsqueeze(-1)
