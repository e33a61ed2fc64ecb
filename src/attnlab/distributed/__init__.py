"""Attention over more than one process (``torch.distributed``): a sequence split over the
ranks of a group, each rank computing its piece's output exactly."""

from attnlab.distributed.sequence import SEQUENCE_PARALLEL_KINDS, sequence_parallel_attention

__all__ = ["SEQUENCE_PARALLEL_KINDS", "sequence_parallel_attention"]
