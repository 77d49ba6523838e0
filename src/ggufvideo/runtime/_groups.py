"""Grouping a model into streamable units, and choosing which ones stay resident under a budget.

Pure bookkeeping over ``nn.Module`` trees and byte counts: no device, no stream. The scheduler in
:mod:`.offload` moves what this plans.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..summary import format_bytes
from ..tensor import GGMLTensor

__all__ = ["Group", "TensorSlot", "parse_budget", "plan_groups", "choose_resident", "tensor_bytes"]

#: Each tensor's place inside a group's device slot is aligned to this (cuBLAS/Triton friendly).
ALIGN = 256

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(budget: int | float | str) -> int:
    """Bytes from ``8 * 2**30``, ``"8GiB"``, ``"8 GB"``, ``"512MiB"``."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget}")
        return int(budget)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"budget {budget!r}: expected bytes or a size such as '8GiB', '512MB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a weight really holds: raw blocks for a :class:`GGMLTensor`."""
    return t.raw.nbytes if isinstance(t, GGMLTensor) else t.nbytes


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class TensorSlot:
    """One parameter or buffer of a group: where it lives and where it goes in the slot."""

    module: nn.Module
    name: str
    is_param: bool
    host: torch.Tensor  # the host copy (GGMLTensor or plain), kept for the group's lifetime
    offset: int  # byte offset in the group's device slot
    nbytes: int
    home: torch.Tensor | None = None  # the original tensor, restored by OffloadHandle.remove()
    #: flat uint8 page-locked bytes to copy from, when not ``host``'s own memory (a shared
    #: mapping of its file: see runtime/_staging.py)
    source: torch.Tensor | None = None
    #: (data_ptr, _version) of ``host``'s raw bytes when ``source`` was taken: a write to the host
    #: tensor since (or new bytes swapped in) makes ``source`` stale
    source_of: tuple[int, int] | None = None


@dataclass
class Group:
    """A module whose weights move together, just before its forward."""

    name: str
    module: nn.Module
    tensors: list[TensorSlot] = field(default_factory=list)
    nbytes: int = 0  # slot bytes (aligned sum)
    resident: bool = False
    index: int = 0  # registration order


def _direct_tensors(module: nn.Module) -> list[tuple[str, bool, torch.Tensor]]:
    out: list[tuple[str, bool, torch.Tensor]] = [
        (n, True, p) for n, p in module._parameters.items() if p is not None]
    out += [(n, False, b) for n, b in module._buffers.items() if b is not None]
    return out


def _subtree_bytes(module: nn.Module, seen: set[int] | None = None) -> int:
    total = 0
    for m in module.modules():
        for _, _, t in _direct_tensors(m):
            if seen is not None:
                if id(t) in seen:
                    continue
                seen.add(id(t))
            total += tensor_bytes(t)
    return total


def _default_target(model: nn.Module) -> int:
    """The size of one repeated block: the largest child of the model's largest ModuleList."""
    best, best_list = 0, 0
    for m in model.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1:
            sizes = [_subtree_bytes(c) for c in m]
            if sum(sizes) > best_list:
                best_list, best = sum(sizes), max(sizes)
    return best or max(1, _subtree_bytes(model) // 8)


def plan_groups(model: nn.Module, *, target_bytes: int | None = None
                ) -> tuple[list[Group], list[Group]]:
    """Split ``model`` into groups that follow its own structure.

    A module whose subtree holds at most ``1.5 * target_bytes`` becomes one group (by default the
    target is one block of the model's largest ``ModuleList``: each transformer block is a group);
    a bigger module is split into its children, and the tensors attached directly to it (Wan's
    ``scale_shift_table``) form a small group of their own that is always resident, since the
    module's own forward may read them at any time.

    Returns:
        ``(groups, pinned)``: streamable groups in registration order, and the always-resident
        groups of directly attached tensors.
    """
    target = target_bytes or _default_target(model)
    groups: list[Group] = []
    pinned: list[Group] = []
    seen: set[int] = set()

    def make(name: str, module: nn.Module,
             members: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> Group:
        g = Group(name=name, module=module)
        off = 0
        for mod, n, is_param, t in members:
            if id(t) in seen or t.device.type == "meta":
                continue
            seen.add(id(t))
            nb = tensor_bytes(t)
            g.tensors.append(TensorSlot(mod, n, is_param, t, off, nb))
            off = _aligned(off + nb)
        g.nbytes = off
        return g

    def visit(name: str, module: nn.Module) -> None:
        if _subtree_bytes(module) <= target * 3 // 2 or not any(True for _ in module.children()):
            members = [(m, n, p, t) for m in module.modules() for n, p, t in _direct_tensors(m)]
            g = make(name or "<model>", module, members)
            if g.tensors:
                g.index = len(groups)
                groups.append(g)
            return
        direct = [(module, n, p, t) for n, p, t in _direct_tensors(module)]
        if direct:
            g = make(f"{name or '<model>'}.<own tensors>", module, direct)
            if g.tensors:
                g.resident = True
                pinned.append(g)
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return groups, pinned


def choose_resident(groups: list[Group], budget: int, *, slots: int, fixed_bytes: int = 0) -> int:
    """Mark groups resident so that everything fits ``budget``; return the slot size in bytes.

    The budget holds ``fixed_bytes`` (always-resident tensors), the resident groups, and ``slots``
    device slots each as large as the largest streamed group. Resident groups are spread evenly
    through the model (every other block rather than the first half), so that each streamed
    group's copy can overlap the compute of the resident groups before it.

    Raises:
        ValueError: naming the smallest budget that works, when even streaming every group does
            not fit.
    """
    for g in groups:
        g.resident = False
    if not groups:
        return 0
    total = sum(g.nbytes for g in groups)
    if fixed_bytes + total <= budget:
        for g in groups:
            g.resident = True
        return 0
    slot = max(g.nbytes for g in groups)
    room = budget - fixed_bytes - slots * slot
    if room < 0:
        raise ValueError(
            f"budget of {format_bytes(budget)} is too small: the always-resident tensors take "
            f"{format_bytes(fixed_bytes)} and {slots} streaming slots of the largest group "
            f"({format_bytes(slot)} each) need {format_bytes(fixed_bytes + slots * slot)}; "
            "raise the budget or lower prefetch")
    # Spread: walk the groups in order, keeping a running share of bytes that may stay.
    share = room / total
    credit = 0.0
    used = 0
    for g in groups:
        credit += share * g.nbytes
        if credit >= g.nbytes and used + g.nbytes <= room:
            g.resident = True
            credit -= g.nbytes
            used += g.nbytes
    return slot
