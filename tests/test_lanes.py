"""ggufvideo.runtime._lanes: the reader lanes' runtime calls, with a stand-in for libcudart that
copies on the CPU (the CUDA runs are the ``gpu`` tests of test_upload.py)."""

from __future__ import annotations

import ctypes
import types

import pytest
import torch

from ggufvideo.runtime import _cudart
from ggufvideo.runtime._lanes import _CudartLane, _CudartSyncLane

SHARED = 0x77  # the side stream the event lanes share


class FakeRuntime:
    """The libcudart calls a lane makes; copies are done at once with memmove."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[str] = []
        self.streams = 0
        self.fail = fail

    def _rc(self, name: str) -> int:
        self.calls.append(name)
        return 1 if name == self.fail else 0

    def cudaSetDevice(self, index):  # noqa: N802 (the runtime's names)
        return self._rc("set")

    def cudaStreamCreateWithFlags(self, out, flags):  # noqa: N802
        assert flags == _cudart.STREAM_NON_BLOCKING
        self.streams += 1
        out._obj.value = 0x1000 + self.streams
        return self._rc("create")

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        assert kind == _cudart.H2D
        assert stream == SHARED or stream.value == 0x1000 + self.streams
        ctypes.memmove(dst, src, n)
        return self._rc("copy")

    def cudaEventCreateWithFlags(self, out, flags):  # noqa: N802
        assert flags == _cudart.EVENT_DISABLE_TIMING
        return self._rc("event")

    def cudaEventRecord(self, event, stream):  # noqa: N802
        assert stream == SHARED
        return self._rc("record")

    def cudaEventSynchronize(self, event):  # noqa: N802
        return self._rc("wait")

    def cudaEventDestroy(self, event):  # noqa: N802
        return self._rc("free event")

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return self._rc("sync")

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.streams -= 1
        return self._rc("destroy")


def test_sync_lane_copies_on_its_own_stream_and_waits_after_each_chunk():
    rt = FakeRuntime()
    lane = _CudartSyncLane(rt, 0)
    src = torch.arange(64, dtype=torch.uint8)
    dst = torch.zeros(64, dtype=torch.uint8)
    lane.wait(0)  # nothing to wait for: record() waited
    lane.copy(dst, 8, src, 16, 32)
    lane.copy(dst, 40, src, 0, 8)
    lane.record(0)
    assert torch.equal(dst[8:40], src[16:48]) and torch.equal(dst[40:48], src[:8])
    assert rt.calls == ["set", "create", "copy", "copy", "sync"]
    lane.close()
    lane.close()  # once only
    assert rt.calls[-2:] == ["sync", "destroy"] and rt.streams == 0


def test_sync_lane_errors_name_the_call():
    with pytest.raises(_cudart.CudaError, match="cudaStreamCreateWithFlags failed"):
        _CudartSyncLane(FakeRuntime(fail="create"), 0)
    lane = _CudartSyncLane(FakeRuntime(fail="copy"), 0)
    t = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(_cudart.CudaError, match=r"cudaMemcpyAsync \(host to device\) failed"):
        lane.copy(t, 0, t, 0, 4)
    lane = _CudartSyncLane(FakeRuntime(fail="sync"), 0)
    with pytest.raises(_cudart.CudaError, match="cudaStreamSynchronize failed"):
        lane.record(0)


def test_event_lane_records_per_buffer_and_waits_before_reuse():
    rt = FakeRuntime()
    lane = _CudartLane(rt, types.SimpleNamespace(cuda_stream=SHARED), 0, slots=2)
    src = torch.arange(16, dtype=torch.uint8)
    dst = torch.zeros(16, dtype=torch.uint8)
    lane.wait(0)  # never recorded: nothing to wait for
    lane.copy(dst, 0, src, 8, 8)
    lane.record(0)
    lane.wait(0)
    lane.wait(0)  # waited once only
    assert torch.equal(dst[:8], src[8:])
    lane.record(1)
    lane.close()
    # close: the unwaited buffer's copies are waited for before its event goes
    assert rt.calls == ["set", "event", "event", "copy", "record", "wait", "record",
                        "free event", "wait", "free event"]
