"""Weight streaming (ggufvideo.offload) and compatibility with accelerate/diffusers offloading.

The scheduling logic (order, prefetch, release, budget accounting) runs on CPU with a backend
that records what it was asked to do; GPU tests are marked ``gpu`` and skip without CUDA.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn

import ggufvideo
from ggufvideo import GGMLTensor
from ggufvideo.ops import swap_quant_layers
from ggufvideo.runtime import SyncBackend, parse_budget, plan_groups
from ggufvideo.runtime._groups import choose_resident

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _q8(rows: int, cols: int, seed: int = 0) -> GGMLTensor:
    x = np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)
    return GGMLTensor(torch.from_numpy(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)),
                      "Q8_0", (rows, cols))


class Block(nn.Module):
    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.up.weight = nn.Parameter(_q8(2 * dim, dim, seed), requires_grad=False)
        self.down.weight = nn.Parameter(_q8(dim, 2 * dim, seed + 1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, dim: int = 64, n: int = 6) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim, 10 * i) for i in range(n))
        self.table = nn.Parameter(torch.randn(dim) * 0.01)  # read by Net.forward itself
        swap_quant_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.table
        for b in self.blocks:
            x = b(x)
        return x


class RecordingBackend(SyncBackend):
    """CPU copies plus a log of the stream-ordering calls (fake streams and events)."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.calls: list[tuple[str, object]] = []
        self._n = 0

    def copy_done(self):
        self._n += 1
        self.calls.append(("copy_done", self._n))
        return ("copy", self._n)

    def wait_copy(self, event):
        self.calls.append(("wait_copy", event))

    def compute_done(self):
        self._n += 1
        self.calls.append(("compute_done", self._n))
        return ("compute", self._n)

    def wait_compute(self, event):
        self.calls.append(("wait_compute", event))


def _model_bytes(m: nn.Module) -> int:
    return sum(t.raw.nbytes if isinstance(t, GGMLTensor) else t.nbytes for t in m.parameters())


# -- budget parsing and planning ---------------------------------------------------------------------
def test_parse_budget_units():
    assert parse_budget("8GiB") == 8 * 2**30
    assert parse_budget("500 MB") == 500 * 10**6
    assert parse_budget(1234) == 1234
    with pytest.raises(ValueError, match="expected bytes or a size"):
        parse_budget("lots")


def test_groups_follow_the_blocks_and_own_tensors_stay_resident():
    groups, pinned = plan_groups(Net())
    assert [g.name for g in groups] == ["embed", *(f"blocks.{i}" for i in range(6))]
    assert [g.name for g in pinned] == ["<model>.<own tensors>"] and pinned[0].resident
    assert all(t.offset % 256 == 0 for g in groups for t in g.tensors)


def test_resident_groups_are_spread_and_fit_the_budget():
    groups, _ = plan_groups(Net())
    blocks = [g for g in groups if g.name.startswith("blocks")]
    slot = max(g.nbytes for g in blocks)
    budget = 2 * slot + 3 * slot  # two slots + room for three blocks
    choose_resident(blocks, budget, slots=2)
    flags = [g.resident for g in blocks]
    assert sum(g.nbytes for g in blocks if g.resident) <= budget - 2 * slot
    assert flags == [False, True, False, True, False, True]  # interleaved, not the first half


def test_budget_too_small_names_what_it_needs():
    with pytest.raises(ValueError, match=r"budget of .* is too small.*2 streaming slots"):
        ggufvideo.offload(Net(), "cpu", budget=1000, backend=RecordingBackend())


# -- scheduling -----------------------------------------------------------------------------------------
def test_streamed_forward_matches_resident_and_restores_host_weights():
    torch.manual_seed(0)
    m = Net()
    x = torch.randn(3, 64)
    ref = m(x)
    host = {n: p for n, p in m.named_parameters()}
    h = ggufvideo.offload(m, "cpu", budget=_model_bytes(m) // 3, backend=RecordingBackend())
    assert h.scheduler is not None and h.streamed_bytes > 0
    for _ in range(2):
        assert torch.equal(m(x), ref)
    # after each group's forward its tensors point at the host copies again
    assert all(p is host[n] for n, p in m.named_parameters() if n.startswith("blocks"))
    h.remove()
    assert torch.equal(m(x), ref)


def test_order_prefetch_and_release():
    m = Net()
    be = RecordingBackend()
    groups_bytes = max(g.nbytes for g in plan_groups(m)[0])
    pinned_bytes = sum(g.nbytes for g in plan_groups(m)[1])
    h = ggufvideo.offload(m, "cpu", budget=pinned_bytes + 2 * groups_bytes, backend=be, prefetch=1)
    sched = h.scheduler
    streamed = [g.name for g in sched.groups]
    assert streamed == ["embed", *(f"blocks.{i}" for i in range(6))]  # nothing fits besides slots
    m(torch.randn(2, 64))
    log = sched.log
    # each group is copied before it runs, and the next one is copied while it runs (prefetch 1)
    runs = [e for e in log if e[0] == "run"]
    assert [r[1] for r in runs] == streamed
    for i, name in enumerate(streamed[:-1]):
        run_at = log.index(("run", name, runs[i][2]))
        nxt = streamed[i + 1]
        copy_at = next(j for j, e in enumerate(log) if e[:2] == ("copy", nxt))
        release_at = log.index(("release", name, runs[i][2]))
        assert run_at < copy_at < release_at  # prefetched during this group's forward
    # two slots alternate; a slot is overwritten only after waiting for its last reader
    assert {r[2] for r in runs} == {0, 1}
    waits = [c for c in be.calls if c[0] == "wait_compute"]
    assert any(w[1] is not None and w[1][0] == "compute" for w in waits)
    # every run waited for its copy on the compute stream
    assert sum(1 for c in be.calls if c[0] == "wait_copy") == len(streamed)
    # one pass copies every streamed group once, plus the next pass's first group (wrap-around)
    assert sched.bytes_copied == h.streamed_bytes + sched.groups[0].nbytes


def test_order_is_learnt_when_blocks_run_out_of_registration_order():
    class Reversed(Net):
        def forward(self, x):
            x = self.embed(x) + self.table
            for b in reversed(self.blocks):
                x = b(x)
            return x

    m = Reversed()
    ref = m(torch.ones(1, 64))
    slot = max(g.nbytes for g in plan_groups(m)[0])
    pinned = sum(g.nbytes for g in plan_groups(m)[1])
    h = ggufvideo.offload(m, "cpu", budget=pinned + 2 * slot, backend=RecordingBackend())
    m(torch.ones(1, 64))
    h.scheduler.log.clear()
    assert torch.equal(m(torch.ones(1, 64)), ref)
    log = h.scheduler.log
    # second pass: blocks.4 is prefetched while blocks.5 runs (learnt successor)
    run5 = next(i for i, e in enumerate(log) if e[:2] == ("run", "blocks.5"))
    assert log[run5 + 1][:2] == ("copy", "blocks.4")


def test_budget_accounting_reports_device_bytes_within_budget():
    m = Net()
    budget = _model_bytes(m) // 2
    h = ggufvideo.offload(m, "cpu", budget=budget, backend=RecordingBackend())
    assert 0 < h.resident_bytes and h.device_bytes <= budget
    assert "streamed" in h.summary() and "resident" in h.summary()


def test_loras_run_under_offload_and_their_device_copies_count_as_resident():
    """apply_lora's adapters (a LoRA pair, a DoRA) on streamed blocks: the same output as without
    offload; their device copies (rank x (in + out) per layer, in the compute dtype, a DoRA's
    factors in float32) are counted as resident, within the budget."""
    torch.manual_seed(0)
    m = Net()
    g = torch.Generator().manual_seed(1)
    sd = {}
    for i in range(6):
        sd[f"blocks.{i}.up.lora_down.weight"] = torch.randn(4, 64, generator=g) * 0.1
        sd[f"blocks.{i}.up.lora_up.weight"] = torch.randn(128, 4, generator=g) * 0.1
    sd["blocks.2.up.dora_scale"] = torch.rand(128, 1, generator=g) + 1
    ggufvideo.apply_lora(m, sd)
    x = torch.randn(3, 64)
    ref = m(x)
    expected = 6 * (4 * 64 + 128 * 4) * 4 + 128 * 4  # float32 compute; the DoRA's g
    budget = _model_bytes(m) // 2
    h = ggufvideo.offload(m, "cpu", budget=budget, backend=RecordingBackend())
    assert h.scheduler is not None and h.adapter_bytes == expected
    assert h.device_bytes <= budget and "LoRA adapters" in h.summary()
    assert h.resident_bytes == expected + sum(gr.nbytes for gr in [*h.groups, *h.pinned]
                                              if gr.resident)
    assert torch.equal(m(x), ref)
    h.remove()


def test_lora_bias_deltas_are_not_changed_under_offload_and_device_copies_go_with_it():
    """A LoRA's bias deltas swap parameters that offload places itself: changing or removing them
    while offloaded is refused with nothing changed; after ``remove()`` of the offload they work.
    ``remove()`` drops the adapters' device copies."""
    from ggufvideo.errors import LoraError

    torch.manual_seed(0)
    m = Net()
    g = torch.Generator().manual_seed(2)
    sd = {"blocks.1.up.lora_down.weight": torch.randn(4, 64, generator=g) * 0.1,
          "blocks.1.up.lora_up.weight": torch.randn(128, 4, generator=g) * 0.1,
          "blocks.1.up.diff_b": torch.randn(128, generator=g)}
    x = torch.randn(3, 64)
    base = m(x)
    lora = ggufvideo.apply_lora(m, sd)
    with_lora = m(x)
    h = ggufvideo.offload(m, "cpu", budget=_model_bytes(m) // 2, backend=RecordingBackend())
    assert torch.equal(m(x), with_lora)
    for change in (lambda: lora.set_scale(0.5), lora.remove,
                   lambda: ggufvideo.apply_lora(m, {"blocks.2.up.diff_b": torch.ones(128)})):
        with pytest.raises(LoraError, match="under ggufvideo.offload"):
            change()
        assert torch.equal(m(x), with_lora)
    (adapter,) = m.blocks[1].up.lora_adapters
    assert adapter._cast  # the copy made when it ran
    h.remove()
    assert not adapter._cast
    lora.set_scale(0.0)
    assert torch.equal(m(x), base)
    lora.remove()


def test_everything_fits_means_no_hooks():
    m = Net()
    h = ggufvideo.offload(m, "cpu", budget="1GiB", backend=RecordingBackend())
    assert h.scheduler is None and h.streamed_bytes == 0


# -- compatibility with accelerate / diffusers -----------------------------------------------------
def test_accelerate_cpu_offload_runs_and_matches():
    accelerate = pytest.importorskip("accelerate")
    m = Net()
    x = torch.randn(2, 64)
    ref = m(x)
    accelerate.cpu_offload(m, execution_device=torch.device("cpu"))
    assert torch.equal(m(x), ref)


def test_accelerate_cpu_offload_with_hook_runs_and_matches():
    accelerate = pytest.importorskip("accelerate")
    m = Net()
    x = torch.randn(2, 64)
    ref = m(x)
    m, hook = accelerate.cpu_offload_with_hook(m, execution_device=torch.device("cpu"))
    assert torch.equal(m(x), ref)
    hook.offload()


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_diffusers_group_offload_without_stream_runs_and_matches(offload_type):
    hooks = pytest.importorskip("diffusers.hooks")
    m = Net()
    x = torch.randn(2, 64)
    ref = m(x)
    kw = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    hooks.apply_group_offloading(m, onload_device=torch.device("cpu"), offload_type=offload_type, **kw)
    assert torch.equal(m(x), ref)


# -- GPU --------------------------------------------------------------------------------------------
def test_a_host_weight_written_after_offload_is_copied_from_its_new_bytes():
    from ggufvideo.runtime.offload import _host_state

    torch.manual_seed(0)
    m = Net()
    x = torch.randn(3, 64)
    h = ggufvideo.offload(m, "cpu", budget=_model_bytes(m) // 3, backend=RecordingBackend())
    streamed = [t for g in h.groups if not g.resident for t in g.tensors]
    assert streamed
    for t in streamed:  # as a remapped file would: the same bytes at another address
        raw = t.host.raw if isinstance(t.host, GGMLTensor) else t.host
        t.source, t.source_of = raw.reshape(-1).view(torch.uint8).clone(), _host_state(t)
    ref = m(x)
    t = next(t for t in streamed if isinstance(t.host, GGMLTensor))
    t.host.raw.zero_()  # an in-place write to the host weight (load_state_dict, a merge...)
    with pytest.warns(UserWarning, match=rf"host weight {t.name!r} of group .* changed after "
                                         "offload"):
        out = m(x)
    assert t.source is None and not torch.equal(out, ref)
    h.remove()
    assert torch.equal(m(x), out)  # what the model computes with its weights as they are now


@pytest.mark.gpu
@cuda
def test_gpu_loras_under_offload_match_resident():
    """apply_lora's adapters on streamed blocks on the GPU: the resident model's output."""
    m = Net(dim=256)
    g = torch.Generator().manual_seed(1)
    sd = {f"blocks.{i}.down.lora_{w}.weight": torch.randn(*shape, generator=g) * 0.05
          for i in range(6) for w, shape in (("down", (8, 512)), ("up", (256, 8)))}
    sd["blocks.3.down.dora_scale"] = torch.rand(256, 1, generator=g) + 1
    ggufvideo.apply_lora(m, sd)
    x = torch.randn(4, 256)
    ref = m.to("cuda")(x.cuda())
    m = m.to("cpu")
    from ggufvideo.adapters import adapter_nbytes

    room = sum(adapter_nbytes(a, torch.float32) for mod in m.modules()
               for a in mod.__dict__.get("lora_adapters") or ())
    h = ggufvideo.offload(m, "cuda", budget=_model_bytes(m) // 3 + room)
    assert h.scheduler is not None and h.adapter_bytes > 0
    for _ in range(2):
        assert torch.allclose(m(x.cuda()), ref, rtol=1e-5, atol=1e-5)
    h.remove()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("prefetch", [1, 2])
def test_gpu_streamed_matches_resident(prefetch):
    m = Net(dim=256)
    x = torch.randn(4, 256)
    ref = m.to("cuda")(x.cuda())
    m = m.to("cpu")
    # a third of the weights, plus room for the extra slot a deeper prefetch needs
    largest = max(g.nbytes for g in plan_groups(m)[0])
    budget = _model_bytes(m) // 3 + (prefetch - 1) * largest
    h = ggufvideo.offload(m, "cuda", budget=budget, prefetch=prefetch)
    assert h.registration is not None
    for _ in range(3):
        assert torch.equal(m(x.cuda()), ref)
    h.remove()


@pytest.mark.gpu
@cuda
def test_gpu_streaming_a_mapped_file_copies_from_the_page_cache(tmp_path):
    src = Net(dim=256)
    path = tmp_path / "net.gguf"
    ggufvideo.save_state_dict(src.state_dict(), path)
    with ggufvideo.empty_weights():
        m = Net(dim=256)
    ggufvideo.load_model(m, path, device="cpu")
    x = torch.randn(4, 256, device="cuda")
    with ggufvideo.empty_weights():
        resident = Net(dim=256)
    ref = ggufvideo.load_model(resident, path, device="cuda")(x)
    h = ggufvideo.offload(m, "cuda", budget=_model_bytes(m) // 3)
    reg = h.registration
    # the quantized blocks are copied from a shared mapping of the file, nothing pinned twice
    assert reg.remapped_bytes > 0 and reg.copied_bytes == 0
    for _ in range(2):
        assert torch.equal(m(x), ref)
    h.remove()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("offload_type,use_stream", [("block_level", True), ("block_level", False),
                                                     ("leaf_level", True), ("leaf_level", False)])
def test_gpu_diffusers_group_offload_matches(offload_type, use_stream):
    hooks = pytest.importorskip("diffusers.hooks")
    m = Net(dim=256)
    x = torch.randn(4, 256, device="cuda")
    ref = m.to("cuda")(x)
    m = m.to("cpu")
    kw = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    hooks.apply_group_offloading(m, onload_device=torch.device("cuda"), offload_type=offload_type,
                                 use_stream=use_stream, **kw)
    for _ in range(2):
        assert torch.equal(m(x), ref)
    # the weights really went to the device (not read from host memory by the GPU)
    assert all(p.raw.device.type == "cpu" for p in m.blocks[0].parameters() if isinstance(p, GGMLTensor))


@pytest.mark.gpu
@cuda
def test_gpu_accelerate_sequential_offload_matches():
    accelerate = pytest.importorskip("accelerate")
    m = Net(dim=256)
    x = torch.randn(4, 256, device="cuda")
    ref = m.to("cuda")(x)
    m = m.to("cpu")
    accelerate.cpu_offload(m, execution_device=torch.device("cuda"))
    assert torch.equal(m(x), ref)


def test_load_model_with_vram_budget_streams(tmp_path):
    src = Net()
    x = torch.randn(2, 64)
    ref = src(x)
    path = tmp_path / "net.gguf"
    ggufvideo.save_state_dict(src.state_dict(), path)
    with ggufvideo.empty_weights():
        m = Net()
    ggufvideo.load_model(m, path, device="cpu", vram_budget=_model_bytes(src) // 2)
    h = m._ggufvideo_offload
    assert h.scheduler is not None and h.device_bytes <= _model_bytes(src) // 2
    assert torch.equal(m(x), ref)


def test_remove_restores_the_original_tensors():
    m = Net()
    before = {n: p for n, p in m.named_parameters()}
    h = ggufvideo.offload(m, "cpu", budget=_model_bytes(m) // 2, backend=RecordingBackend())
    m(torch.randn(1, 64))
    h.remove()
    assert all(p is before[n] for n, p in m.named_parameters())


# -- torch.compile inside streamed groups ------------------------------------------------------------
def test_compiled_block_forwards_run_under_offload_without_recompiling():
    """Compiling each block's forward (the offload hooks stay outside, on the module call) gives
    one graph for all blocks: the streamed weights are graph inputs, so pointing them at another
    slot each pass does not recompile."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    m = Net()
    x = torch.randn(3, 64)
    ref = m(x)
    h = ggufvideo.offload(m, "cpu", budget=_model_bytes(m) // 3, backend=RecordingBackend())
    assert h.scheduler is not None and not any(g.resident for g in h.groups)
    for b in m.blocks:
        b.forward = torch.compile(b.forward, backend="aot_eager")
    for _ in range(4):
        assert torch.equal(m(x), ref)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["frames"]["total"] == 1  # compiled once, not per block or per pass
    torch._dynamo.reset()
