"""How :func:`~.offload.offload` moves bytes and orders streams: on the calling thread
(:class:`SyncBackend`, CPU devices and tests) or on a side CUDA stream (:class:`CudaBackend`)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SyncBackend", "CudaBackend"]


# -- backends: how bytes move and how streams order ----------------------------------------------
class SyncBackend:
    """Copies at once on the calling thread; events are no-ops. CPU "devices" and tests."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy each ``(dst, src)`` pair (one group's tensors into its slot)."""
        for dst, src in pairs:
            dst.copy_(src)

    def copy_done(self) -> Any:
        """An event marking the copies issued so far (on the side stream)."""
        return None

    def wait_copy(self, event: Any) -> None:
        """Make the compute stream wait for ``event``."""

    def compute_done(self) -> Any:
        """An event marking the compute issued so far (on the compute stream)."""
        return None

    def wait_compute(self, event: Any) -> None:
        """Make the side stream wait for ``event`` before its next copy."""


class CudaBackend(SyncBackend):
    """Copies on a side CUDA stream; the streams order each other through events only."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.side = torch.cuda.Stream(device)

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        # One switch to the side stream per group (entering the context costs about as much host
        # time as issuing a copy).
        with torch.cuda.stream(self.side):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)

    def copy_done(self) -> Any:
        ev = torch.cuda.Event()
        ev.record(self.side)
        return ev

    def wait_copy(self, event: Any) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def compute_done(self) -> Any:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def wait_compute(self, event: Any) -> None:
        if event is not None:
            self.side.wait_event(event)
