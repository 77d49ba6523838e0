"""Weight streaming: run a model larger than the GPU, its quantized weights copied in per block.

:func:`offload` splits a model into groups that follow its own structure (each transformer block;
see :func:`~._groups.plan_groups`), keeps as many groups on the device as a budget allows, and
streams the rest: before a streamed group's forward its raw blocks are copied from host memory
into a preallocated device *slot* on a side stream, the compute stream waits only for that copy,
and the next streamed group(s) are prefetched into the other slots while this one computes. After
the forward the slot is released (reused once the compute stream has passed an event).

The hooks are accelerate's shape (``pre_forward`` / ``post_forward`` around a module's forward,
the class untouched); the scheduling logic (order, prefetch, release, budget) lives in
:class:`StreamScheduler` and talks to the device through a small backend object, so tests drive
it on CPU with a fake backend that records what happened.

Limits: the hooks run Python and synchronise through events around every group, so a CUDA graph
cannot capture across groups; ``torch.compile`` of the whole model graph-breaks at each hook
(compile the blocks instead: ``for b in model.blocks: b.compile()``) -- not measured here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..adapters import adapter_nbytes, release_device_copies
from ..loader import resolve_device
from ..tensor import GGMLTensor
from ._backends import CudaBackend, SyncBackend
from ._groups import Group, TensorSlot, choose_resident, parse_budget, plan_groups, tensor_bytes
from ._staging import HostRegistration, locked_storage, register_host

__all__ = ["offload", "OffloadHandle", "StreamScheduler", "CudaBackend", "SyncBackend",
           "STREAMED_MARK"]

#: A module's ``__dict__`` key: the names of its tensors :func:`offload` placed (it puts its own
#: copies back into ``_parameters`` around every forward, so swapping one in meanwhile is lost).
STREAMED_MARK = "_ggufvideo_offloaded"


# -- the scheduler ---------------------------------------------------------------------------------
class StreamScheduler:
    """Which streamed group is in which device slot, what to prefetch, when a slot is free.

    Args:
        groups: the streamed groups (registration order: the first guess of execution order).
        slots: the device slots (uint8 tensors, each at least the largest group).
        backend: how copies and stream ordering are done.
        prefetch: how many groups ahead to copy while one computes (``len(slots) - 1`` at most).

    The execution order is learnt as it runs: the group that follows each group is remembered,
    so a model that runs its blocks in another order than it registers them (or skips some) is
    prefetched right from its second pass.
    """

    def __init__(self, groups: list[Group], slots: list[torch.Tensor], backend: SyncBackend,
                 prefetch: int = 1) -> None:
        if not slots:
            raise ValueError("StreamScheduler needs at least one device slot")
        self.groups = groups
        self.slots = slots
        self.backend = backend
        self.prefetch = max(0, min(prefetch, len(slots) - 1))
        self._next = {id(g): groups[(i + 1) % len(groups)] for i, g in enumerate(groups)}
        self._slot_of: dict[int, int] = {}  # group id -> slot holding its bytes
        self._holder: list[Group | None] = [None] * len(slots)
        self._busy: list[bool] = [False] * len(slots)  # a group in this slot is running
        self._released: list[Any] = [None] * len(slots)  # compute event after its last use
        self._copied: dict[int, Any] = {}  # group id -> copy-done event
        self._last: Group | None = None
        # The device tensors of a group in a slot are views of that slot, built once: a pass then
        # only re-points parameters (building the wrappers cost ~10 us each, per tensor per pass).
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._pairs: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.log: list[tuple[str, str, int]] = []  # (what, group name, slot): for tests and tracing
        self.bytes_copied = 0

    # -- internals ---------------------------------------------------------------------------
    def _predicted(self, after: Group, n: int) -> list[Group]:
        out, g = [], after
        for _ in range(n):
            g = self._next[id(g)]
            if g is after or g in out:
                break
            out.append(g)
        return out

    def _free_slot(self, keep: Iterable[Group]) -> int | None:
        keep_ids = {id(g) for g in keep}
        # An empty slot first, then the slot whose group is not needed soon.
        for i, h in enumerate(self._holder):
            if h is None and not self._busy[i]:
                return i
        for i, h in enumerate(self._holder):
            if not self._busy[i] and h is not None and id(h) not in keep_ids:
                return i
        return None

    def _load(self, g: Group, slot: int) -> None:
        old = self._holder[slot]
        if old is not None:
            self._slot_of.pop(id(old), None)
            self._copied.pop(id(old), None)
        self.backend.wait_compute(self._released[slot])  # the slot's last reader is done
        if _drop_stale_sources(g):
            for k in [k for k in self._pairs if k[0] == id(g)]:
                del self._pairs[k]
        pairs = self._pairs.get((id(g), slot))
        if pairs is None:  # built once per (group, slot), like the views
            buf = self.slots[slot]
            pairs = self._pairs[(id(g), slot)] = [
                (buf[t.offset:t.offset + t.nbytes], t.source if t.source is not None else
                 _host_raw(t).reshape(-1).view(torch.uint8)) for t in g.tensors]
        self.backend.copy(pairs)
        self._copied[id(g)] = self.backend.copy_done()
        self._holder[slot] = g
        self._slot_of[id(g)] = slot
        self.bytes_copied += g.nbytes
        self.log.append(("copy", g.name, slot))

    # -- the two hook points -----------------------------------------------------------------
    def before(self, g: Group) -> None:
        """``g`` is about to run: make its bytes ready, point its tensors at them, prefetch."""
        if self._last is not None and self._next.get(id(self._last)) is not g:
            self._next[id(self._last)] = g  # learn the order
        self._last = g
        upcoming = self._predicted(g, self.prefetch)
        if id(g) not in self._slot_of:
            slot = self._free_slot(keep=upcoming)
            if slot is None:
                raise RuntimeError(f"offload: no free device slot for group {g.name!r} (all "
                                   f"{len(self.slots)} slots are running groups: re-entrant "
                                   "forward?)")
            self._load(g, slot)
        slot = self._slot_of[id(g)]
        self._busy[slot] = True
        self.backend.wait_copy(self._copied[id(g)])
        self.log.append(("run", g.name, slot))
        views = self._views.get((id(g), slot))
        if views is None:
            views = self._views[(id(g), slot)] = [_device_view(t, self.slots[slot])
                                                  for t in g.tensors]
        for t, v in zip(g.tensors, views):
            _put(t, v)
        for nxt in upcoming:
            if id(nxt) in self._slot_of:
                continue
            free = self._free_slot(keep=[g, *upcoming])
            if free is None:
                break
            self._load(nxt, free)

    def after(self, g: Group) -> None:
        """``g`` has run: its slot may be overwritten once the compute stream passes this point."""
        slot = self._slot_of[id(g)]
        self._released[slot] = self.backend.compute_done()
        self._busy[slot] = False
        _point_host(g)
        self.log.append(("release", g.name, slot))


def _device_view(t: Any, buf: torch.Tensor) -> torch.Tensor:
    view = buf[t.offset:t.offset + t.nbytes]
    h = t.host
    dev: torch.Tensor
    if isinstance(h, GGMLTensor):
        dev = GGMLTensor(view.view(h.raw.shape), h.qtype, h.shape, h.dtype)
    else:
        dev = view.view(h.dtype).view(h.shape)
    if t.is_param:
        dev = nn.Parameter(dev, requires_grad=False)
    return dev


def _host_raw(t: TensorSlot) -> torch.Tensor:
    return t.host.raw if isinstance(t.host, GGMLTensor) else t.host


def _host_state(t: TensorSlot) -> tuple[int, int]:
    raw = _host_raw(t)
    return raw.data_ptr(), raw._version


def _drop_stale_sources(g: Group) -> bool:
    """Host tensors written to (or given new bytes) since offload: copy from them again, not
    from the file's shared mapping, which no longer holds their bytes. Whether any was."""
    dropped = False
    for t in g.tensors:
        if t.source is not None and _host_state(t) != t.source_of:
            t.source, t.source_of = None, None
            dropped = True
            warnings.warn(f"ggufvideo.offload: host weight {t.name!r} of group {g.name!r} changed "
                          "after offload(); it is now copied from pageable memory (slower). "
                          "Call handle.remove() and offload() again after changing weights",
                          stacklevel=4)
    return dropped


def _put(t: TensorSlot, value: torch.Tensor | None) -> None:
    """Store ``value`` as ``t``'s parameter or buffer on its module (no ``__setattr__`` checks)."""
    if t.is_param:
        # torch types ``_parameters`` as holding ``Parameter``s; a GGMLTensor marked as a parameter
        # is one only at run time (``_is_param``), and a moved host copy is a plain tensor.
        t.module._parameters[t.name] = value  # type: ignore[assignment]
    else:
        t.module._buffers[t.name] = value


def _point_host(g: Group) -> None:
    for t in g.tensors:
        _put(t, t.host)


# -- hooks and the handle --------------------------------------------------------------------------
class _GroupHook:
    """accelerate-style hook: ``pre_forward`` / ``post_forward`` around one group's module."""

    def __init__(self, scheduler: StreamScheduler, group: Group) -> None:
        self.scheduler, self.group = scheduler, group

    def pre_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.scheduler.before(self.group)

    def post_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        self.scheduler.after(self.group)


class OffloadHandle:
    """What :func:`offload` set up. ``remove()`` takes the hooks off and puts every weight back
    on the host (the model is then as before ``offload``)."""

    def __init__(self, model: nn.Module, groups: list[Group], pinned: list[Group],
                 scheduler: StreamScheduler | None, registration: HostRegistration | None,
                 budget: int, slot_bytes: int, hooks: list[Any], adapter_bytes: int = 0) -> None:
        self.model, self.groups, self.pinned, self.scheduler = model, groups, pinned, scheduler
        self.registration, self.budget, self.slot_bytes = registration, budget, slot_bytes
        self.adapter_bytes = adapter_bytes
        self._hooks = hooks

    @property
    def resident_bytes(self) -> int:
        """Device bytes of weights that stay (resident groups, always-resident tensors, and the
        device copies of ``apply_lora``'s adapters)."""
        return sum(g.nbytes for g in [*self.groups, *self.pinned] if g.resident) + \
            self.adapter_bytes

    @property
    def streamed_bytes(self) -> int:
        """Host bytes copied in for every forward pass."""
        return sum(g.nbytes for g in self.groups if not g.resident)

    @property
    def device_bytes(self) -> int:
        """All device memory held for weights: resident ones plus the streaming slots."""
        n = len(self.scheduler.slots) if self.scheduler is not None else 0
        return self.resident_bytes + n * self.slot_bytes

    def summary(self) -> str:
        """One line per group: name, size, resident or streamed."""
        lines = [f"budget {self.budget / 2**30:.2f} GiB: "
                 f"{self.resident_bytes / 2**30:.2f} GiB resident, "
                 f"{self.streamed_bytes / 2**30:.2f} GiB streamed through "
                 f"{len(self.scheduler.slots) if self.scheduler else 0} slots of "
                 f"{self.slot_bytes / 2**20:.1f} MiB"]
        if self.adapter_bytes:
            lines.append(f"  resident {self.adapter_bytes / 2**20:9.1f} MiB  LoRA adapters")
        for g in [*self.pinned, *self.groups]:
            where = "resident" if g.resident else "streamed"
            lines.append(f"  {where} {g.nbytes / 2**20:9.1f} MiB  {g.name}")
        return "\n".join(lines)

    def remove(self) -> None:
        """Take the hooks off, put every weight back on the host, and drop the device copies of
        ``apply_lora``'s adapters."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for g in [*self.groups, *self.pinned]:
            for t in g.tensors:
                _put(t, t.home)
        for m in self.model.modules():
            m.__dict__.pop(STREAMED_MARK, None)
        release_device_copies(self.model)
        if self.registration is not None:
            self.registration.release()


def offload(model: nn.Module, device: torch.device | str = "cuda",
            budget: int | float | str = "8GiB", *, prefetch: int = 1,
            target_group_bytes: int | None = None, backend: SyncBackend | None = None
            ) -> OffloadHandle:
    """Run ``model`` on ``device`` with at most ``budget`` bytes of its weights there.

    Groups that fit the budget are moved to ``device`` and stay; the others stay in host memory
    (page-locked without a second copy: a GGUF file's pages through a shared mapping of it, other
    tensors' bytes moved into locked memory of their own; raw GGUF blocks are copied, never
    decoded on the host) and are copied in on a side stream just before their forward, ``prefetch``
    groups ahead, then released. Works for any ``nn.Module`` whose weights sit on the host (or
    the device: they are brought back); quantized or not, LoRA layers included: peft's adapter
    weights are parameters of their layer and travel with its group; the adapters of
    :func:`ggufvideo.apply_lora` (small beside the weights: rank x (in + out) per layer) are
    copied to the device when first run and stay there, counted as resident here (apply them
    before ``offload``: ones applied later are not counted).

    Args:
        model: the model, weights on the host (``load_model(..., device=None)``).
        device: where it computes.
        budget: bytes of device memory for weights (an int or ``"8GiB"``/``"500MB"``): resident
            groups plus ``prefetch + 1`` streaming slots, each the size of the largest streamed
            group. Activations are not counted.
        prefetch: groups copied ahead of the one computing.
        target_group_bytes: size of a group (default: one block of the model's largest
            ``ModuleList``).
        backend: the copy/stream backend (tests pass a recording one).

    Returns:
        an :class:`OffloadHandle` (``.summary()``, ``.remove()``).

    Raises:
        ValueError: the budget cannot hold the always-resident tensors and the slots (the message
            says how much it needs).
    """
    device = torch.device(device)
    if device.type == "cuda" and backend is None and not torch.cuda.is_available():
        raise RuntimeError(f"ggufvideo.offload: device {str(device)!r} but CUDA is not available "
                           "in this PyTorch (weight streaming needs a CUDA GPU)")
    device = resolve_device(device)
    nbudget = parse_budget(budget)
    groups, pinned = plan_groups(model, target_bytes=target_group_bytes)
    adapters = _adapter_bytes(model)
    fixed = sum(g.nbytes for g in pinned) + adapters
    slot_bytes = choose_resident(groups, nbudget, slots=prefetch + 1, fixed_bytes=fixed)
    for g in [*pinned, *groups]:
        for t in g.tensors:
            t.home = (t.module._parameters if t.is_param else t.module._buffers)[t.name]
            # offload keeps its own record of these tensors: a parameter swapped in by someone
            # else (a LoRA's bias delta) would be overwritten by the next pass (see STREAMED_MARK)
            t.module.__dict__.setdefault(STREAMED_MARK, set()).add(t.name)
    for g in [*pinned, *groups]:
        if g.resident:
            for t in g.tensors:
                t.host = t.host.to(device)
                _put(t, nn.Parameter(t.host, requires_grad=False) if t.is_param and not isinstance(
                    t.host, nn.Parameter) else t.host)
    streamed = [g for g in groups if not g.resident]
    registration = None
    scheduler = None
    hooks: list[Any] = []
    if streamed:
        be = backend or (CudaBackend(device) if device.type == "cuda" else SyncBackend(device))
        for g in streamed:  # weights that sat on the device come back to the host
            for t in g.tensors:
                if t.host.device.type != "cpu":
                    t.host = t.host.to("cpu")
                _put(t, t.host)
        if device.type == "cuda" and backend is None:
            slots_ = [t for g in streamed for t in g.tensors]
            registration, sources = register_host([_host_raw(t) for t in slots_], device)
            _pin_unlocked(slots_, sources, registration, device)
        slots = [be.empty(slot_bytes) for _ in range(prefetch + 1)]
        scheduler = StreamScheduler(streamed, slots, be, prefetch=prefetch)
        for g in streamed:
            hook = _GroupHook(scheduler, g)
            hooks.append(g.module.register_forward_pre_hook(hook.pre_forward, with_kwargs=True))
            hooks.append(g.module.register_forward_hook(hook.post_forward, with_kwargs=True,
                                                        always_call=True))
    # Whatever the groups did not cover (buffers on modules split further, e.g. rope tables).
    _move_rest(model, device, exclude={id(t.host) for g in streamed for t in g.tensors})
    return OffloadHandle(model, groups, pinned, scheduler, registration, nbudget, slot_bytes, hooks,
                         adapters)


def _adapter_bytes(model: nn.Module) -> int:
    """Device bytes the adapters on ``model``'s layers take once run, in each layer's compute
    dtype (the dtype its weight reports)."""
    total = 0
    for m in model.modules():
        adapters = m.__dict__.get("lora_adapters")
        if not adapters:
            continue
        weight = getattr(m, "weight", None)
        dtype = getattr(m, "compute_dtype", None) or (
            weight.dtype if isinstance(weight, torch.Tensor) else torch.float32)
        total += sum(adapter_nbytes(a, dtype) for a in adapters)
    return total


def _pin_unlocked(tensors: list[TensorSlot], sources: list[torch.Tensor | None],
                  registration: HostRegistration, device: torch.device) -> None:
    """Each host tensor copies from its page-locked source; one registration did not lock has its
    bytes moved into locked memory of its own (:func:`._staging.locked_storage`), else gets a
    pinned copy (counted in the handle)."""
    for t, src in zip(tensors, sources):
        if src is not None:
            remapped = src.data_ptr() != _host_raw(t).data_ptr()
            t.source = src if remapped else None
            t.source_of = _host_state(t) if remapped else None
            continue
        t.source, t.source_of = None, None
        if locked_storage(_host_raw(t), registration, device) is not None:
            continue  # (the same tensor objects, their bytes now in locked memory)
        t.host = t.host.pin_memory()
        registration.copied_bytes += tensor_bytes(t.host)
        _put(t, t.host)


def _move_rest(model: nn.Module, device: torch.device, exclude: set[int]) -> None:
    def stays(t: torch.Tensor) -> bool:
        return id(t) in exclude or t.device == device or t.device.type == "meta"

    for m in model.modules():
        for n, p in list(m._parameters.items()):
            if p is None or stays(p):
                continue
            moved = p.to(device)
            m._parameters[n] = nn.Parameter(moved, requires_grad=p.requires_grad and not isinstance(
                moved, GGMLTensor))
            m.__dict__.setdefault(STREAMED_MARK, set()).add(n)
        for n, b in list(m._buffers.items()):
            if b is None or stays(b):
                continue
            m._buffers[n] = b.to(device)
