"""Runtime memory management: stream quantized weights to the GPU (:func:`offload`)."""

from __future__ import annotations

from ._groups import parse_budget, plan_groups
from .offload import CudaBackend, OffloadHandle, StreamScheduler, SyncBackend, offload
from .sequence import PartSequence, stream_pipeline

__all__ = ["offload", "OffloadHandle", "StreamScheduler", "SyncBackend", "CudaBackend",
           "parse_budget", "plan_groups", "PartSequence", "stream_pipeline"]
