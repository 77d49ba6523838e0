"""Kernel settings per quant type and GPU: which kernel a call takes and how it is launched.

The fused small-M kernels (:mod:`._matmul`) were tuned on one GPU, an H100 (compute capability
9.0, which the H200 shares). Their tables -- how many rows take the fused kernels at all, which row
counts take the CUDA-core (row / GEMV) kernels, the launch rules, where split-K sums are added in
the kernel -- hold for that GPU only, so they are kept here as one :class:`KernelSettings` per
(quant type, compute capability), and dispatch reads the settings of the tensor's device
(:func:`settings_for`).

* sm_90 (H100, H200): the measured values (:data:`SM90`; the measurements are quoted there).
* Any other GPU (:data:`UNTUNED`): the simplest correct choice, decode + vendor GEMM for every M
  (``fused_rows`` = 0). Calling :func:`._matmul.fused_linear` directly there still works: it
  takes the chunked / tensor-core kernel (or the CUDA-core kernels with ``gemv=True``) with the
  H100's launch rules, adds split-K sums with the second kernel, and is where tuning for another
  GPU starts (``benchmarks/gpu_linear.py --tune``; :func:`set_settings` installs the result).
* The CPU, where the kernels run only under Triton's interpreter (tests): sm_90's settings
  (:data:`CPU_CAPABILITY`), so that the tests exercise the tuned dispatch.

Imports torch only (no triton).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import torch

__all__ = ["CPU_CAPABILITY", "FUSED_ROWS", "SM90", "UNTUNED", "KernelSettings", "Rule",
           "capability_of", "set_settings", "settings_for"]

#: A launch rule: (BN or weight rows per program, waves, num_warps, num_stages). ``waves`` is how
#: many programs per SM the K dimension is split to reach.
Rule = tuple[int, int, int, int]


@dataclass(frozen=True)
class KernelSettings:
    """How one quant type's linear calls run on one kind of GPU.

    ``fused_rows``: :func:`ggufvideo.kernels.linear` takes the fused kernels for 1..fused_rows
    activation rows (0: decode + vendor GEMM for every M). ``cuda_core_rows`` = (fewest, most):
    the row counts for which :func:`._matmul.fused_linear` takes the type's CUDA-core kernel (the
    row kernel or the GEMV kernel) by default; (0, 0): never. ``one_row_rule`` /
    ``few_rows_rule``: that kernel's launch rule for one row / for 2+ rows (``None``: the one-row
    rule). ``tile_rules``: the chunked / tensor-core kernel's rule per activation-tile height
    (1, 16, 32, 64).
    ``fixup_tiles``: the tile heights where the K-split partial sums are added by the tile's last
    program rather than by a second kernel (same bits either way).
    """

    fused_rows: int
    cuda_core_rows: tuple[int, int]
    one_row_rule: Rule
    few_rows_rule: Rule | None
    tile_rules: tuple[tuple[int, Rule], ...]
    fixup_tiles: tuple[int, ...] = ()

    def tile_rule(self, bm: int) -> Rule:
        """The chunked / tensor-core kernel's launch rule for activation-tile height ``bm``."""
        return dict(self.tile_rules)[bm]

    def cuda_core_rule(self, m: int) -> Rule:
        """The CUDA-core kernel's launch rule for ``m`` activation rows."""
        return self.few_rows_rule if m > 1 and self.few_rows_rule is not None else self.one_row_rule


# -- sm_90: measured on an H100 -----------------------------------------------------------------
# The chunked / tensor-core kernel's launch rule per tile height. Chosen by sweeping BN in 32..256,
# waves in 1..16, 1..8 warps and 1..4 stages for Q4_K (and a subset for the other types) on the
# Wan-14B shapes on an H100 (geometric mean over the shapes); ``benchmarks/gpu_linear.py --tune``
# repeats such a sweep.
_SM90_TILE_RULES: tuple[tuple[int, Rule], ...] = (
    (1, (32, 8, 4, 1)), (16, (64, 8, 4, 3)), (32, (128, 4, 4, 3)), (64, (128, 4, 4, 3)))

#: The tuned settings for sm_90 (H100, H200), per type. Where the numbers come from:
#:
#: * ``fused_rows``: the most rows for which the fused kernel beat decode + cuBLAS on an H100
#:   (Wan-14B shapes, CUDA-graph timings in benchmarks/gpu_results_h100.md): past 16 rows the
#:   tensor-core branch decodes more per byte than the 4/5-bit K-quants need, and loses for the
#:   others.
#: * ``cuda_core_rows`` and ``few_rows_rule``: measured on an H100 (CUDA graphs, Wan-14B shapes
#:   5120x5120 / 5120x13824 / 13824x5120, ``benchmarks/gpu_linear.py --one-row --one-row-ms 1 2
#:   4``), against the tensor-core path: Q4_K 2 rows 20.7 / 40.1 / 42.7 us vs 27.5 / 49.4 / 48.2
#:   (4 rows: 30.5 / 67.1 / 69.4 vs 27.6 / 49.6 / 48.8, so 3-4 rows stay on tensor cores); Q8_0 2
#:   rows 35.2 / 70.0 / 70.6 vs 55.6 / 112 / 111, 4 rows 50.0 / 97.5 / 113 vs 56.0 / 115 / 112;
#:   Q6_K 2 rows 28.8 / 53.9 / 55.4 vs 59.2 / 116 / 119, 4 rows 34.1 / 64.0 / 65.5 vs 59.4 / 116
#:   / 119; Q4_0 2 rows 27.3 / 62.8 / 55.0 vs 41.0 / 85.5 / 85.3 (4 rows: 44.4 / 89.2 / 91.2 vs
#:   41.3 / 86.6 / 86.3; one row: 23.1 / 49.7 / 46.5 vs the chunked kernel's 22.1 / 42.3 / 45.2).
#:   Q5_K lost at 2 rows (30.9 / 60.3 / 63.2 vs 30.4 / 57.2 / 55.9). Three rows take the 4-row
#:   kernels.
#: * ``one_row_rule``: Q4_K's row kernel (rows per program, waves, warps, stages), measured on an
#:   H100 (CUDA graphs, the same shapes): 16.3 / 30.8 / 32.4 us against the chunked kernel's 20.8
#:   / 39.9 / 41.2 us (bf16: 30.3 / 64.5 / 66.3 us); one row per warp was the best of 1-4 rows
#:   per warp, 1-8 warps, 2-8 super-blocks per warp step and K splits of 1-4 (those shapes need
#:   none: 1280+ programs; split in two they ran 3-30% slower), and loading the next step before
#:   using this one ran 5-20% slower. The GEMV kernel, against the chunked kernel's one-row branch
#:   (H100, CUDA-graph timings, Wan-14B shapes), ran Q6_K 1.7-2.3x, Q8_0 ~1.1x and Q5_K ~1.05x
#:   faster, and Q4_0 0.9-1.0x (kept for two rows).
#: * ``fixup_tiles``: measured on an H100 (CUDA graphs, Wan-14B shapes): at tile 16 it took Q4_K
#:   from 32.2/62.4/63.8 us to 28.9/52.1/50.4 us and Q5_K ~1 us lower; at one row, at tiles 32/64
#:   and for the other types it was level or up to 20% slower (the last program's extra latency
#:   outweighs the launch it saves).
SM90: dict[str, KernelSettings] = {
    "Q4_K": KernelSettings(64, (1, 2), (4, 2, 4, 1), (4, 2, 4, 1), _SM90_TILE_RULES, (16,)),
    "Q5_K": KernelSettings(64, (1, 1), (64, 8, 4, 1), None, _SM90_TILE_RULES, (16,)),
    "Q4_0": KernelSettings(16, (2, 2), (64, 8, 4, 1), (32, 8, 4, 1), _SM90_TILE_RULES),
    "Q8_0": KernelSettings(16, (1, 4), (64, 8, 4, 1), (32, 8, 4, 1), _SM90_TILE_RULES),
    "Q6_K": KernelSettings(16, (1, 4), (32, 8, 4, 1), (64, 8, 4, 1), _SM90_TILE_RULES),
}

#: A GPU nobody tuned: decode + vendor GEMM for every M; direct fused-kernel calls default to the
#: chunked / tensor-core kernel with the H100's launch rules and the second kernel for split-K sums.
UNTUNED: dict[str, KernelSettings] = {
    name: replace(s, fused_rows=0, cuda_core_rows=(0, 0), fixup_tiles=())
    for name, s in SM90.items()}

#: The per-type row limit of the fused path on sm_90 (``ggufvideo.kernels.FUSED_ROWS``); other
#: GPUs: :func:`settings_for`.
FUSED_ROWS: dict[str, int] = {name: s.fused_rows for name, s in SM90.items()}

#: The capability the CPU (Triton's interpreter) takes settings from.
CPU_CAPABILITY = (9, 0)

_TABLE: dict[tuple[str, tuple[int, ...]], KernelSettings] = {
    (name, (9, 0)): s for name, s in SM90.items()}
_LOOKUP: dict[tuple[str, torch.device], KernelSettings] = {}  # settings_for's cache
_LOCK = threading.Lock()


def capability_of(device: torch.device) -> tuple[int, int]:
    """The compute capability whose settings ``device`` takes (the CPU: :data:`CPU_CAPABILITY`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return CPU_CAPABILITY


def settings_for(qtype: str, device: torch.device) -> KernelSettings:
    """The settings of quant type ``qtype`` (a name with a fused kernel) on ``device``.

    Tuned settings where there are some for the device's compute capability, else
    :data:`UNTUNED`'s. Cached per (type, device); :func:`set_settings` clears the cache.
    """
    key = (qtype, device)
    found = _LOOKUP.get(key)
    if found is None:
        cap = tuple(capability_of(device))
        found = _TABLE.get((qtype, cap)) or UNTUNED[qtype]
        _LOOKUP[key] = found
    return found


def set_settings(qtype: str, capability: tuple[int, int], settings: KernelSettings | None) -> None:
    """Install ``settings`` for ``qtype`` on GPUs of ``capability`` (``None``: back to untuned).

    For tuning runs (``benchmarks/gpu_linear.py --tune``) and for users who measured their GPU.
    """
    if qtype not in SM90:
        raise ValueError(f"set_settings: no fused kernel for {qtype!r}; types: {sorted(SM90)}")
    with _LOCK:
        if settings is None:
            _TABLE.pop((qtype, tuple(capability)), None)
        else:
            _TABLE[(qtype, tuple(capability))] = settings
        _LOOKUP.clear()
