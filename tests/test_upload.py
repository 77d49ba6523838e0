"""load_model(device="cuda")'s staged upload (ggufvideo.runtime._upload): chunk planning, the
order of reads, copies and buffer reuse, byte identity and the fallbacks, on CPU with a fake
device side; the real thing on a GPU (marked gpu)."""

from __future__ import annotations

import threading

import pytest
import torch
from test_offload import Net, _q8

import ggufvideo
from ggufvideo import GGMLTensor
from ggufvideo.loader import read_tensors
from ggufvideo.reader import GGUFFile
from ggufvideo.runtime import _upload
from ggufvideo.runtime._upload import ChunkPlan, _raw, plan_chunks, upload, upload_state

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class FakeStaging:
    """CPU "device": pinned memory is plain, copies happen at once; the log says in which order
    reads, copies, records and waits happened, each tagged with the lane (reader) whose thread
    made it (None outside a reader)."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.log: list[tuple] = []
        self.buffers: list[torch.Tensor] = []
        self.lanes: list[FakeLane] = []
        self._lock = threading.Lock()
        self._current = threading.local()  # the lane a reader thread works for

    def note(self, *event) -> None:
        with self._lock:
            self.log.append((getattr(self._current, "lane", None), *event))

    def pinned(self, n):
        b = torch.empty(n, dtype=torch.uint8)
        with self._lock:
            self.buffers.append(b)
        self.note("pinned", n)
        return b

    def empty(self, n):
        self.note("empty", n)
        return torch.full((n,), 0xAA, dtype=torch.uint8)  # unwritten bytes show

    def copy(self, dst, src):
        dst.copy_(src)
        self.note("copy", None)

    def lane(self, slots):
        lane = FakeLane(self, slots)
        with self._lock:
            lane.id = len(self.lanes)
            self.lanes.append(lane)
        self._current.lane = lane.id
        return lane

    def finish(self):
        self.note("finish")


class FakeLane:
    def __init__(self, st, slots):
        self.st, self.slots, self.closed = st, slots, False

    def copy(self, dst, dst_at, src, src_at, n):
        dst[dst_at:dst_at + n].copy_(src[src_at:src_at + n])
        self.st.note("copy", src_at)

    def record(self, slot):
        self.st.note("record", slot)

    def wait(self, slot):
        self.st.note("wait", slot)

    def close(self):
        self.closed = True
        self.st.note("close")
        self.st._current.lane = None


def _file(tmp_path, n=6):
    sd = {f"w{i}": _q8(64, 32 * (i + 1), seed=i) for i in range(n)}
    sd["bias"] = torch.randn(17)
    path = tmp_path / "t.gguf"
    ggufvideo.save_state_dict(sd, path)
    return str(path)


def _spans(tensors, base):
    """(offset in the file, bytes) of each tensor mapped from a file mapped at ``base``."""
    return [(_raw(t).data_ptr() - base, _raw(t).nbytes) for t in tensors]


def _staged_file(tmp_path, monkeypatch, *, readers=3, chunk=1000):
    """A small GGUF's tensors (lazy views of its mapping) and its span, with ``readers`` readers
    and ``chunk``-byte chunks."""
    monkeypatch.setattr(_upload, "READERS", readers)
    monkeypatch.setattr(_upload, "MAX_GAP", 0)
    monkeypatch.setattr(_upload, "CHUNK_BYTES", chunk)
    file = GGUFFile(_file(tmp_path))
    return list(read_tensors(file, lazy=True).values()), _upload.file_span(file)


def test_chunks_cover_every_byte_once_in_file_order():
    spans = [(0, 100), (100, 50), (4000, 300), (4100, 20), (10**6, 0), (200_000, 1000)]
    chunks = plan_chunks(spans, chunk_bytes=128, max_gap=1000)
    assert [c.offset for c in chunks] == sorted(c.offset for c in chunks)
    assert all(0 < c.nbytes <= 128 for c in chunks)
    for i, (s, n) in enumerate(spans):
        got = sorted((c.offset + at, into, m) for c in chunks for at, j, into, m in c.pieces
                     if j == i)
        assert sum(m for _, _, m in got) == n  # each byte once (overlapping spans included)
        assert all(file_at == s + into for file_at, into, _ in got)
    # 0..150 is one run (adjacent), 4000..4300 another (4100 lies inside), 200000.. a third
    assert {c.offset for c in chunks if c.offset < 150} == {0, 128}
    assert chunks[-1].offset >= 200_000
    plan = ChunkPlan(spans, chunk_bytes=128, max_gap=1000)  # what the readers size and start by
    assert (plan.count, plan.largest) == (len(chunks), max(c.nbytes for c in chunks))
    assert ChunkPlan([(0, 50), (10**6, 0)], 128).largest == 50  # a buffer no larger than needed
    assert ChunkPlan([(0, 0)]).count == 0


@pytest.mark.parametrize("readers", [1, 3])
def test_staged_read_is_byte_identical_and_refills_a_buffer_only_after_its_copies(
        tmp_path, monkeypatch, readers):
    monkeypatch.setattr(_upload, "BUFFERS", 2)
    tensors, (p, base, size) = _staged_file(tmp_path, monkeypatch, readers=readers)
    st = FakeStaging()
    real = _upload._read_into

    def read(fd, offset, out, p):
        at = out.ctypes.data
        buf = next(k for k, b in enumerate(st.buffers) if 0 <= at - b.data_ptr() < b.numel())
        st.note("read", offset, (buf, (at - st.buffers[buf].data_ptr()) // 1000))
        real(fd, offset, out, p)
    monkeypatch.setattr(_upload, "_read_into", read)
    out = upload(tensors, torch.device("cpu"), path=p, base=base, size=size, mode="read",
                 staging=st)
    for a, b in zip(tensors, out):
        assert type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype
        ra, rb = _raw(a), _raw(b)
        assert torch.equal(ra.view(torch.uint8), rb.view(torch.uint8))
        assert rb.data_ptr() != ra.data_ptr()  # a copy, not a view of the mapping
    chunks = plan_chunks(_spans(tensors, base), 1000, 0)
    assert len(chunks) > 2 * readers * 2
    reads = [e for e in st.log if e[1] == "read"]
    assert sorted(e[2] for e in reads) == [c.offset for c in chunks]
    # each reader page-locks its own 2 buffers, in its thread; the readers claim chunks in file
    # order (each one's reads ascend; which reader gets which is the scheduler's), each
    # alternating its own two buffers
    assert len(st.buffers) == readers and all(b.numel() == 2 * 1000 for b in st.buffers)
    made = [e for e in st.log if e[1] == "pinned"]
    assert sorted(e[0] for e in made) == list(range(readers))  # one in each reader's thread
    assert len(st.lanes) == readers and {e[0] for e in reads} <= set(range(readers))
    owned = {tid: {e[3] for e in reads if e[0] == tid} for tid in range(readers)}
    assert all(not (owned[a] & owned[b]) for a in owned for b in owned if a < b)
    for tid in range(readers):
        mine = [e for e in st.log if e[0] == tid]
        offsets = [e[2] for e in mine if e[1] == "read"]
        assert offsets == sorted(offsets)
        slots = [e[3] for e in mine if e[1] == "read"]
        assert slots[::2] == [slots[0]] * len(slots[::2]) if slots else True
        if len(slots) > 1:
            assert slots[0] != slots[1] and slots[1::2] == [slots[1]] * len(slots[1::2])
        # before every read into a buffer: a wait on that buffer, and (after its first use) the
        # record made after the copies out of it came before the wait
        events = [e[1:] for e in mine]
        for j, at in enumerate(i for i, e in enumerate(events) if e[0] == "read"):
            slot = j % 2
            assert events[at - 1] == ("wait", slot)
            if j >= 2:
                prev = max(i for i, e in enumerate(events[:at - 1]) if e == ("record", slot))
                between = [e[0] for e in events[prev - 1:prev]]
                assert between == ["copy"]  # the copies out of it came before its record
        assert events[-1] == ("close",)
    assert all(lane.closed for lane in st.lanes) and st.log[-1][1] == "finish"


def test_an_arena_makes_one_buffer_and_aligned_views(tmp_path, monkeypatch):
    """ARENA: one device allocation, each tensor a view at an aligned offset; same bytes."""
    monkeypatch.setattr(_upload, "ARENA", True)
    tensors, (p, base, size) = _staged_file(tmp_path, monkeypatch, chunk=700)
    st = FakeStaging()
    out = upload(tensors, torch.device("cpu"), path=p, base=base, size=size, mode="read",
                 staging=st)
    made = [e for e in st.log if e[1] == "empty"]
    sizes = [_raw(t).nbytes for t in tensors]
    assert [e[2] for e in made] == [sum(-(-n // 512) * 512 for n in sizes)]  # one allocation
    raws = [_raw(t) for t in out]
    starts = [r.data_ptr() for r in raws]
    assert all((a - starts[0]) % 512 == 0 for a in starts)
    assert len({r.untyped_storage().data_ptr() for r in raws}) == 1
    for a, r in zip(tensors, raws):
        assert torch.equal(_raw(a).view(torch.uint8), r.view(torch.uint8))


def test_each_buffer_is_made_once_before_the_readers_start(tmp_path, monkeypatch):
    # 700-byte chunks: tensors span chunks, so readers share them
    tensors, (p, base, size) = _staged_file(tmp_path, monkeypatch, chunk=700)
    tensors.append(torch.empty(0))  # not in the file: copied with .to()
    st = FakeStaging()
    out = upload(tensors, torch.device("cpu"), path=p, base=base, size=size, mode="read",
                 staging=st)
    made = [e for e in st.log if e[1] == "empty"]
    sizes = sorted(_raw(t).nbytes for t in tensors[:-1])
    assert sorted(e[2] for e in made) == sizes  # once per tensor
    assert all(e[0] is None for e in made)  # in the calling thread...
    first_read = next(i for i, e in enumerate(st.log) if e[1] in ("pinned", "copy"))
    assert st.log.index(made[-1]) < first_read  # ...before any reader started
    assert out[-1].numel() == 0 and len(out) == len(tensors)


def test_a_reader_held_back_does_not_keep_its_share_of_the_file(tmp_path, monkeypatch):
    """Chunks go to whichever reader is free: one reader stuck on its first chunk until all
    the others are read finishes (a fixed share per reader would wait forever)."""
    tensors, (p, base, size) = _staged_file(tmp_path, monkeypatch)
    n_chunks = len(plan_chunks(_spans(tensors, base), 1000, 0))
    real = _upload._read_into
    lock, done, rest = threading.Lock(), [0], threading.Event()
    first = []

    def read(fd, offset, out, p):
        with lock:
            stuck = not first
            first.append(offset)
        if stuck:
            assert rest.wait(10), "the other readers left chunks to the held-back one"
        real(fd, offset, out, p)
        with lock:
            done[0] += 1
            if done[0] == n_chunks - 1:
                rest.set()
    monkeypatch.setattr(_upload, "_read_into", read)
    out = upload(tensors, torch.device("cpu"), path=p, base=base, size=size, mode="read",
                 staging=FakeStaging())
    assert all(torch.equal(_raw(a).view(torch.uint8), _raw(b).view(torch.uint8))
               for a, b in zip(tensors, out))


def test_a_failed_read_stops_the_readers_and_closes_every_lane(tmp_path, monkeypatch):
    tensors, (p, base, size) = _staged_file(tmp_path, monkeypatch)
    (tmp_path / "t.gguf").write_bytes((tmp_path / "t.gguf").read_bytes()[:size // 2])
    st = FakeStaging()
    with pytest.raises(OSError, match=r"t\.gguf: short read at offset \d+ while loading to the GPU"):
        upload(tensors, torch.device("cpu"), path=p, base=base, size=size, mode="read",
               staging=st)
    assert st.lanes and all(lane.closed for lane in st.lanes)
    # the side stream is drained after every lane closed, before the ring is let go
    kinds = [e[1] for e in st.log]
    assert kinds[-1] == "finish" and "close" not in kinds[kinds.index("finish"):]


def test_a_failed_registered_copy_drains_the_stream_before_unregistering(monkeypatch):
    from ggufvideo.runtime import _staging

    order = []

    class Reg:
        def release(self):
            order.append("release")

    monkeypatch.setattr(_staging, "register_host",
                        lambda ts, device=None: (Reg(), [None] * len(ts)))

    class Failing(FakeStaging):
        def copy(self, dst, src):
            raise RuntimeError("copy failed")

        def finish(self):
            order.append("finish")

    with pytest.raises(RuntimeError, match="copy failed"):
        upload([torch.ones(4)], torch.device("cpu"), mode="register", staging=Failing())
    assert order == ["finish", "release"]


def _bytes(m):
    return {n: (p.raw if isinstance(p, GGMLTensor) else p).reshape(-1).view(torch.uint8).clone()
            for n, p in m.state_dict().items()}


@pytest.mark.parametrize("mode", ["read", "register", "plain"])
def test_load_model_through_the_staged_path_matches_the_plain_load(tmp_path, monkeypatch, mode):
    src = Net()
    path = tmp_path / "net.gguf"
    ggufvideo.save_state_dict(src.state_dict(), path)
    with ggufvideo.empty_weights():
        plain = Net()
    ggufvideo.load_model(plain, path, device="cpu")
    calls = []
    monkeypatch.setattr(_upload, "use_fast_upload", lambda dev: True)
    monkeypatch.setattr(_upload, "MODE", mode)
    monkeypatch.setattr(_upload, "CudaStaging", lambda dev, **kw: calls.append(dev) or FakeStaging())
    monkeypatch.setattr(_upload, "CHUNK_BYTES", 4096)
    with ggufvideo.empty_weights():
        staged = Net()
    ggufvideo.load_model(staged, path, device="cpu")
    a, b = _bytes(staged), _bytes(plain)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert len(calls) == (0 if mode == "plain" else 1)
    x = torch.randn(2, 64)
    assert torch.equal(staged(x), plain(x))


def test_tensors_outside_the_file_and_tied_keys_fall_back_and_dedupe(tmp_path):
    path = _file(tmp_path, n=2)
    file = GGUFFile(path)
    sd = read_tensors(file, lazy=True)
    sd["joined"] = torch.cat([sd["bias"], sd["bias"]])  # not in the mapping: plain .to()
    sd["tied"] = sd["w0"]
    st = FakeStaging()
    out = upload_state(sd, list(sd), torch.device("cpu"), file, staging=st)
    assert out["tied"] is out["w0"] and torch.equal(out["joined"], sd["joined"])
    assert torch.equal(out["w1"].raw, sd["w1"].raw) and out["w1"].raw.data_ptr() != sd["w1"].raw.data_ptr()
    copied = sum(1 for e in st.log if e[1] == "copy")
    assert copied >= 3  # w0, w1, bias (once each at least; w0 not twice for its tied key)


def test_a_staging_whose_lanes_wait_per_chunk_gets_one_buffer_per_reader(tmp_path, monkeypatch):
    tensors, (path, base, size) = _staged_file(tmp_path, monkeypatch, readers=2, chunk=1000)
    monkeypatch.setattr(_upload, "BUFFERS", 3)
    st = FakeStaging()
    st.sync = True  # what CudaStaging(sync=True) says: its lanes wait in record()
    out = upload(tensors, torch.device("cpu"), path=path, base=base, size=size, staging=st)
    assert [e[2] for e in st.log if e[1] == "pinned"] == [1000, 1000]  # one chunk each
    assert {e[2] for e in st.log if e[1] in ("record", "wait")} == {0}
    for a, b in zip(tensors, out):
        assert torch.equal(_raw(a), _raw(b))


def test_unknown_mode_names_the_variable(tmp_path):
    t = torch.ones(4)
    with pytest.raises(ValueError, match="GGUFVIDEO_UPLOAD must be read, register or plain"):
        upload([t], torch.device("cpu"), mode="fast", staging=FakeStaging())


def test_without_cuda_load_model_does_not_stage(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not _upload.use_fast_upload(torch.device("cuda"))
    assert not _upload.use_fast_upload(torch.device("cpu"))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["read", "read-sync", "read-torch", "read-arena", "register",
                                  "plain"])
def test_gpu_load_model_staged_is_byte_identical(tmp_path, monkeypatch, mode):
    src = Net(dim=256)
    path = tmp_path / "net.gguf"
    ggufvideo.save_state_dict(src.state_dict(), path)
    if mode in ("read", "read-sync"):
        from ggufvideo.runtime._cudart import lib
        assert lib() is not None  # the libcudart path is what runs
    monkeypatch.setattr(_upload, "USE_CUDART", mode != "read-torch")
    monkeypatch.setattr(_upload, "SYNC_LANES", mode == "read-sync")
    monkeypatch.setattr(_upload, "ARENA", mode == "read-arena")
    monkeypatch.setattr(_upload, "MODE", mode.split("-")[0])
    monkeypatch.setattr(_upload, "CHUNK_BYTES", 64 << 10)  # many chunks, buffers reused
    with ggufvideo.empty_weights():
        host = Net(dim=256)
    ggufvideo.load_model(host, path, device="cpu")
    with ggufvideo.empty_weights():
        dev = Net(dim=256)
    ggufvideo.load_model(dev, path, device="cuda")
    for (n, a), b in zip(_bytes(host).items(), _bytes(dev).values()):
        assert b.device.type == "cuda" and torch.equal(a, b.cpu()), n
    x = torch.randn(2, 256)
    assert torch.equal(dev(x.cuda()).cpu(), host.cuda()(x.cuda()).cpu())
