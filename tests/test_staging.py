"""Page-locking host weights without a second copy (ggufvideo.runtime._staging, ._filemap):
file-mapped tensors are locked through a shared read-only mapping of their file, on CPU with a
fake ``cudaHostRegister``; written-to pages and plain memory are locked in place."""

from __future__ import annotations

import mmap
import os
import warnings

import pytest
import torch
from test_offload import Net
from torch import nn

import ggufvideo
from ggufvideo import GGMLTensor
from ggufvideo.runtime import _filemap, _staging
from ggufvideo.runtime._filemap import file_mappings, shared_views
from ggufvideo.runtime._staging import HostRegistration, locked_storage, register_host

linux = pytest.mark.skipif(not file_mappings() or not os.access("/proc/self/pagemap", os.R_OK),
                           reason="needs /proc/self/maps and /proc/self/pagemap (Linux)")


def _raws(tmp_path):
    path = tmp_path / "net.gguf"
    ggufvideo.save_state_dict(Net().state_dict(), path)
    sd = ggufvideo.load_state_dict(path, lazy=True)
    return sd, [t.raw if isinstance(t, GGMLTensor) else t for t in sd.values()]


def _perms_at(addr: int) -> str:
    with open("/proc/self/maps") as fh:
        for line in fh:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return line.split()[1]
    return ""


def test_registration_answers_which_spans_a_locked_range_covers():
    from ggufvideo.runtime._staging import HostRegistration

    reg = HostRegistration()
    for start, end in [(0x9000, 0xA000), (0x1000, 0x3000), (0x5000, 0x6000)]:  # any order
        reg.add(start, end)
    assert reg.registered_bytes == 0x1000 + 0x2000 + 0x1000
    assert reg.covers(0x1000, 0x2000) and reg.covers(0x2FFF, 1) and reg.covers(0x9800, 0x800)
    assert not reg.covers(0x0FFF, 2)  # starts before the first range
    assert not reg.covers(0x2800, 0x1000)  # runs past the end of its range
    assert not reg.covers(0x3000, 1) and not reg.covers(0x4000, 0x1000)  # in a gap
    assert not reg.covers(0xA000, 1)
    assert not HostRegistration().covers(0x1000, 1)


def test_file_mappings_keeps_private_mappings_of_regular_files(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0000000000-7f0000100000 r--p 00001000 fd:01 1234 /models/wan.gguf\n"
        "7f0000100000-7f0000200000 r--s 00000000 fd:01 1234 /models/wan.gguf\n"
        "7f0000200000-7f0000300000 rw-p 00000000 00:00 0 \n"
        "7f0000300000-7f0000400000 r--p 00000000 fd:01 99 /models/old.gguf (deleted)\n"
        "7e0000000000-7e0000001000 rw-p 00002000 08:10 77 /lib/with space.so\n")
    got = file_mappings(str(maps))
    assert [(m.start, m.offset, m.dev, m.inode, m.path) for m in got] == [
        (0x7e0000000000, 0x2000, (8, 16), 77, "/lib/with space.so"),
        (0x7f0000000000, 0x1000, (0xfd, 1), 1234, "/models/wan.gguf")]
    assert file_mappings(str(tmp_path / "missing")) == []


@linux
def test_shared_views_hold_the_files_bytes_in_a_shared_mapping(tmp_path):
    _, raws = _raws(tmp_path)
    views, files = shared_views(raws)
    assert files and all(v is not None for v in views)
    for r, v in zip(raws, views):
        assert torch.equal(r.reshape(-1).view(torch.uint8), v)
        assert v.data_ptr() != r.data_ptr()
        assert _perms_at(v.data_ptr()) == "r--s" and _perms_at(r.data_ptr())[3] == "p"


@linux
def test_a_tensor_written_to_or_not_from_a_file_has_no_shared_view(tmp_path):
    _, raws = _raws(tmp_path)
    raws[0].view(torch.uint8).reshape(-1)[:1] += 1  # copy-on-write: no longer the file's page
    plain = torch.randn(1000)
    views, _ = shared_views([*raws, plain])
    assert views[0] is None and views[-1] is None
    page = mmap.PAGESIZE
    written = raws[0].data_ptr() // page
    for r, v in zip(raws[1:], views[1:-1]):  # tensors off the written page still have views
        pages = range(r.data_ptr() // page, (r.data_ptr() + r.numel() * r.element_size() - 1)
                      // page + 1)
        assert (v is None) == (written in pages)
    assert any(v is not None for v in views[1:-1])


class FakeCudart:
    def __init__(self, ok=True):
        self.ok, self.calls, self.unregistered = ok, [], []

    def cudaHostRegister(self, start, n, flags):  # noqa: N802 (the CUDA name)
        self.calls.append((start, n, flags))
        return 0 if self.ok else 1

    def cudaHostUnregister(self, start):  # noqa: N802
        self.unregistered.append(start)
        return 0


@pytest.fixture
def fake_cuda(monkeypatch):
    rt = FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: rt)
    return rt


@linux
def test_register_host_locks_the_shared_mapping_and_never_heap_memory(tmp_path, fake_cuda):
    _, raws = _raws(tmp_path)
    plain = torch.randn(4096)
    reg, sources = register_host([*raws, plain])
    assert sources[-1] is None  # heap memory: its pages are shared with other allocations
    assert all(s is not None for s in sources[:-1])
    assert all(s.data_ptr() != r.data_ptr() for s, r in zip(sources, raws))  # remapped
    assert reg.remapped_bytes == sum(r.numel() * r.element_size() for r in raws)
    locked = [(s, s + n) for s, n, _ in fake_cuda.calls]
    assert all(flags == 8 for *_, flags in fake_cuda.calls)  # read-only
    for src in sources[:-1]:
        assert any(lo <= src.data_ptr() and src.data_ptr() + src.numel() <= hi for lo, hi in locked)
    for r in [*raws, plain]:  # neither the private mapping nor the heap is ever locked
        assert not any(lo < r.data_ptr() + r.numel() * r.element_size() and r.data_ptr() < hi
                       for lo, hi in locked)
    reg.release()
    assert sorted(fake_cuda.unregistered) == sorted(lo for lo, _ in locked)


def test_heap_tensors_move_into_locked_memory_of_their_own(fake_cuda):
    """A heap tensor's first and last pages hold other allocations: locking them in place makes
    any copy of those straddle a locked range (CUDA: "invalid argument"). Its bytes move into a
    mapping of their own instead, locked whole; the tensor object stays the same."""
    neighbour = torch.randn(7)
    t = nn.Parameter(torch.randn(300, 5), requires_grad=False)
    want, addr = t.detach().clone(), t.data_ptr()
    reg = HostRegistration()
    assert locked_storage(t, reg) is t
    assert t.data_ptr() != addr and torch.equal(t, want)  # same object, same values, moved
    ((start, n, flags),) = fake_cuda.calls
    assert start % mmap.PAGESIZE == 0 and n % mmap.PAGESIZE == 0 and flags == 8
    assert start <= t.data_ptr() and t.data_ptr() + t.numel() * 4 <= start + n
    assert not start <= neighbour.data_ptr() < start + n
    assert reg.moved_bytes == n and reg.registered_bytes == n
    assert locked_storage(t, reg) is t and len(fake_cuda.calls) == 1  # moved once only
    reg.release()
    assert fake_cuda.unregistered == [start] and torch.equal(t, want)  # still its memory
    fake_cuda.ok = False
    other = torch.randn(10)
    before = other.data_ptr()
    assert locked_storage(other, HostRegistration()) is None and other.data_ptr() == before


def test_failed_registration_leaves_none_and_warns(tmp_path, monkeypatch, fake_cuda):
    fake_cuda.ok = False
    monkeypatch.setattr(_staging, "_clear_cuda_error", lambda: None)
    _, raws = _raws(tmp_path)
    with pytest.warns(UserWarning, match="cudaHostRegister failed for some host weights; "
                                         "pinning copies"):
        reg, sources = register_host(raws[:1])
    assert sources == [None] and reg.registered_bytes == 0
    assert [f for *_, f in fake_cuda.calls] == [8, 0]  # read-only first, then default


def test_registration_is_made_on_the_target_device(monkeypatch, fake_cuda):
    current = []

    class Device:  # torch.cuda.device without CUDA: records which device is current
        def __init__(self, d):
            self.d = d

        def __enter__(self):
            current.append(self.d)

        def __exit__(self, *exc):
            current.pop()

    seen = []
    register = fake_cuda.cudaHostRegister
    fake_cuda.cudaHostRegister = lambda *a: seen.append(list(current)) or register(*a)
    monkeypatch.setattr(torch.cuda, "device", Device)
    locked_storage(torch.randn(4096), HostRegistration(), torch.device("cuda", 1))
    assert seen == [[torch.device("cuda", 1)]]
    locked_storage(torch.randn(4096), HostRegistration())  # no device: the current one
    assert seen[-1] == []


def test_a_non_contiguous_tensor_is_left_to_a_pinned_copy(fake_cuda):
    t = torch.randn(64, 64).t()
    _, sources = register_host([t, torch.randn(64)])
    assert sources == [None, None] and not fake_cuda.calls
    assert locked_storage(t, HostRegistration()) is None and not fake_cuda.calls


def test_without_proc_nothing_is_remapped(tmp_path, monkeypatch, fake_cuda):
    monkeypatch.setattr(_filemap, "file_mappings", lambda: [])
    _, raws = _raws(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg, sources = register_host(raws)
    assert sources == [None] * len(raws) and not fake_cuda.calls  # left to the caller
    assert reg.remapped_bytes == 0


def _rss_anon() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@linux
def test_gpu_registering_a_mapped_file_copies_no_page(tmp_path):
    path = tmp_path / "big.gguf"
    ggufvideo.save_state_dict({"w": torch.randn(64 << 18)}, path)  # 64 MiB
    sd = ggufvideo.load_state_dict(path, lazy=True)
    raws = list(sd.values())
    torch.zeros(1, device="cuda")
    before = _rss_anon()
    reg, sources = register_host(raws)
    grew = _rss_anon() - before
    assert reg.remapped_bytes == 64 << 20 and reg.registered_bytes >= 64 << 20
    assert grew < 16 << 20  # registering the private mapping grew it by the whole 64 MiB
    dev = sources[0].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(dev.cpu(), raws[0].reshape(-1).view(torch.uint8))
    reg.release()


def test_offload_moves_heap_weights_into_locked_memory_keeping_their_objects(fake_cuda):
    """What offload does with the weights registration leaves (heap memory): the same parameter
    objects, their bytes now in locked memory of their own; nothing pinned twice."""
    from ggufvideo.runtime._groups import plan_groups
    from ggufvideo.runtime.offload import _pin_unlocked

    m = Net(dim=64)
    groups, _ = plan_groups(m)
    slots = [t for g in groups for t in g.tensors]
    params = [t.host for t in slots]
    values = [p.detach().clone() for p in params]
    reg, sources = register_host([t.host for t in slots])
    assert all(s is None for s in sources)
    _pin_unlocked(slots, sources, reg, torch.device("cuda"))
    assert [t.host for t in slots] == params  # the same objects
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert reg.copied_bytes == 0 and len(fake_cuda.calls) == len(slots)
    for p in params:
        assert any(lo <= p.data_ptr() < lo + n for lo, n, _ in fake_cuda.calls)
