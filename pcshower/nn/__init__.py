"""Neural-network building blocks that work on ragged point-cloud batches (flat points + ``batch``)."""

from pcshower.nn.epic import EPiCLayer, EPiCNetwork
from pcshower.nn.pooling import segment_mean, segment_sum
from pcshower.nn.transformer import InducedSetBlock, SetTransformer

__all__ = ["EPiCLayer", "EPiCNetwork", "InducedSetBlock", "SetTransformer", "segment_mean",
           "segment_sum"]
