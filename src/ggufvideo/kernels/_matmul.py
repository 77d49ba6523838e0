"""Fused dequantize + matmul for few rows of activations (``y = x @ W.T``, M <= 64): dispatch.

The kernels live one family per module: :mod:`._chunked` (the chunked kernel: one row on the
CUDA cores, more rows through ``tl.dot``), :mod:`._gemv` (the GEMV kernel), :mod:`._row` (the
row kernel), and :mod:`._fused_common` (loads, stores and K-split sums they share). This module
picks the kernel and its launch rule per call (:func:`fused_linear`) and hands out the K-split
arrival counters.

Memory bound in principle: each weight byte is read once and used in registers, never written
out as a dense weight, so the traffic follows the quantized size (Q4_K is 3.6x smaller than
bf16). In practice the per-element work limits it, so the loop is built to do little per weight:

* Weights are split into chunks that share one scale (a 32- or 16-element (sub-)block): each
  chunk is ``D * u + MB`` with small integer codes ``u``, and its contribution is
  ``D * sum(u * x) + MB * sum(x)`` -- codes times activations, the scale applied once per chunk
  (the arrangement ggml's own dot products use). No weight is rounded on the way: the result is
  the exact-weight product accumulated in float32, not bit-identical to the large-M path
  (decode, round to the activation dtype, cuBLAS), and at least as accurate.
* Codes become floats through their bit patterns, not conversion instructions (see
  :func:`._fused_common._to_f32` and :func:`._chunked._accum`).
* One to :data:`ROW_MAX_M` activation rows (timestep/modulation projections, batch-1 work and
  its CFG pair) can run on the CUDA cores, decoding each weight once for all rows: for the types
  in :data:`ROW_STEPS` in the row kernel, whose warps read whole weight rows with wide contiguous
  loads (the fastest to load by far, see :func:`._row._rows_kernel`); for the types in
  :data:`GEMV_STEPS` in a GEMV kernel that applies the scale per weight and sums once at the end.
  :mod:`.settings` says for which row counts they are the default on each GPU (where they
  measured faster on an H100; on GPUs nobody tuned, ``linear`` never takes a fused kernel).
  Otherwise one row takes the chunked kernel's one-row branch, and more rows go through
  ``tl.dot`` with the activations padded to a 16/32/64-row tile.
* Each step covers 256 elements of K (one super-block, or eight 32-element blocks), so K must be
  a multiple of 256; K is split across programs to fill the GPU and the float32 partial sums are
  added in a fixed order (deterministic results).

Imports triton at the top: reached only through :mod:`ggufvideo.kernels`.
"""

from __future__ import annotations

import threading
from functools import cache

import torch

from ._chunked import FUSED_TYPES, _fused_kernel
from ._decode import triton
from ._dequant import TL_DTYPES, kernel_spec, soft_bf16
from ._fused_common import BK, _reduce_kernel
from ._gemv import GEMV_STEPS, _gemv_kernel
from ._row import ROW_J, ROW_MAX_M, ROW_STEPS, _rows_kernel
from .settings import Rule, settings_for

__all__ = ["BK", "FUSED_TYPES", "GEMV_STEPS", "ROW_MAX_M", "ROW_STEPS", "arrival_counters",
           "block_m", "fused_linear", "split_for"]

@cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def block_m(m: int) -> int:
    """The activation tile height for ``m`` rows (1: the CUDA-core path)."""
    return 1 if m == 1 else 16 if m <= 16 else (32 if m <= 32 else 64)


def split_for(m: int, n: int, k: int, bn: int, waves: int, device: torch.device) -> int:
    """K split (a power of two, at most 32) giving at least ``waves`` programs per SM."""
    programs = triton.cdiv(n, bn)
    steps = k // BK
    split = 1
    while programs * split < waves * _sm_count(device) and split * 2 <= steps and split < 32:
        split *= 2
    return split


#: Arrival-counter slots per device (int32, 1 MiB), handed out round-robin by
#: :func:`arrival_counters`.
COUNTER_RING = 1 << 18
_RINGS: dict[torch.device, list] = {}  # device -> [zeroed int32 ring, next free slot]
_RINGS_LOCK = threading.Lock()  # calls from several threads never share slots


def arrival_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """``n`` zeroed int32 arrival counters for one split-K call, or ``None`` where there are none.

    The slots come round-robin from one zero-initialised ring per device. A call's programs count
    their arrivals per column tile and the last one resets its counter, so slots are zero again
    when the call ends and are reused without clearing; the next call takes the next slots. Calls
    on one stream run one after another; calls on different streams (or CUDA graphs replayed on
    different streams) could only meet on a slot if they ran at the same time while
    :data:`COUNTER_RING` slots apart. Returns ``None`` -- the caller then adds the partial sums with
    a second kernel -- when ``n`` exceeds the ring, or when the ring does not exist yet during a
    CUDA-graph capture (allocating there would tie it to the graph's memory pool).
    """
    if n > COUNTER_RING:
        return None
    with _RINGS_LOCK:
        ring = _RINGS.get(device)
        if ring is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            ring = _RINGS[device] = [torch.zeros(COUNTER_RING, dtype=torch.int32, device=device), 0]
        buf, first = ring
        if first + n > COUNTER_RING:
            first = 0
        ring[1] = first + n
    return buf[first:first + n]


def fused_linear(x2d: torch.Tensor, raw: torch.Tensor, name: str, n: int, *,
                 rule: Rule | None = None,
                 gemv: bool | None = None, fixup: bool | None = None) -> torch.Tensor:
    """``x2d (M, K) @ W.T`` for ``W`` the ``(n, K)`` weight of type ``name`` in ``raw``
    (n, row_bytes).

    ``x2d`` is float16 or bfloat16 with unit stride along K, M <= 64; ``K`` a multiple of 256.
    The output is ``(M, n)`` of ``x2d``'s dtype. ``rule`` = (BN, waves, num_warps, num_stages)
    overrides the device's settings (:func:`.settings.settings_for`; the benchmarks tune with it).
    ``gemv`` picks the CUDA-core kernel (``None``: the device's ``cuda_core_rows`` -- the row
    kernel for :data:`ROW_STEPS`, the GEMV kernel for :data:`GEMV_STEPS`, decoding each weight
    once for all rows; ``True``: those kernels for any 1..:data:`ROW_MAX_M` rows; ``False``: the
    chunked / tensor-core kernel). For the row kernel ``rule`` is (weight rows per program,
    waves, num_warps, num_stages).

    When K is split across programs, the float32 partial sums are added either by the last
    program of each column tile (``fixup=True``; :func:`arrival_counters`) or by a second kernel
    (``fixup=False``), in the same order, so the results are the same bits. ``None`` takes the
    device's ``fixup_tiles`` (falling back to the second kernel when a CUDA-graph
    capture finds no counters yet).
    """
    spec = kernel_spec(name)
    m, k = x2d.shape
    if raw.data_ptr() % 16:
        raw = raw.clone()  # the steps read 2- and 4-byte units; a fresh allocation is aligned
    bm = block_m(m)
    has_cuda_core = name in ROW_STEPS or name in GEMV_STEPS
    if gemv and not (has_cuda_core and m <= ROW_MAX_M):
        raise ValueError(f"fused_linear({name}): the GEMV kernel takes up to {ROW_MAX_M} rows of "
                         f"a type in {sorted(GEMV_STEPS.keys() | ROW_STEPS.keys())}, got {m} rows")
    if name not in FUSED_TYPES:
        raise ValueError(f"fused_linear: no fused kernel for {name}; types: {sorted(FUSED_TYPES)}")
    tuned = settings_for(name, x2d.device)
    if gemv is None:
        fewest, most = tuned.cuda_core_rows
        gemv = fewest <= m <= most
    default = tuned.cuda_core_rule(m) if gemv else tuned.tile_rule(bm)
    bn, waves, num_warps, num_stages = rule or default
    split = split_for(m, n, k, bn, waves, x2d.device)
    steps = k // BK
    per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, per_split)
    out_dtype = TL_DTYPES[x2d.dtype]
    grid = (triton.cdiv(n, bn), split)
    if split == 1:
        y = out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
        count = None
    else:
        y = torch.empty((split, m, n), dtype=torch.float32, device=x2d.device)
        out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
        use = bm in tuned.fixup_tiles if fixup is None else fixup
        count = arrival_counters(x2d.device, grid[0]) if use else None
        if fixup and count is None:
            raise RuntimeError(f"fused_linear: fixup=True but no arrival counters for {grid[0]} "
                               f"column tiles (more than COUNTER_RING={COUNTER_RING}, or the "
                               "device's first split-K call made during a CUDA-graph capture)")
    f0, f1, f2, f3, f4 = spec.offsets
    common = dict(TS=spec.type_size, F0=f0, F1=f1, F2=f2, F3=f3, F4=f4, OUT=out_dtype,
                  PARTIAL=split > 1, FIXUP=count is not None, SOFT=soft_bf16(),
                  num_warps=num_warps, num_stages=num_stages)
    # Without counters the dummies are never touched (FIXUP is off).
    cnt = count if count is not None else y
    rows_bm = 1 if m == 1 else 2 if m == 2 else 4  # the CUDA-core kernels' activation rows
    if gemv and name in ROW_STEPS:
        _rows_kernel[grid](x2d, raw, y, out, cnt, split, m, n, k, x2d.stride(0), raw.stride(0),
                           per_split, 0x3F800000, STEP=ROW_STEPS[name], R=bn, J=ROW_J,
                           BM=rows_bm, **common)
        return _add_partials(y, out, m * n, split, count, out_dtype)
    common.update(BYTES_PER_STEP=BK // spec.block_size * spec.type_size, BN=bn)
    if gemv:
        step, (ta, tb) = GEMV_STEPS[name]
        _gemv_kernel[grid](x2d, raw, y, out, cnt, split, m, n, k, x2d.stride(0), raw.stride(0),
                           per_split, 0x4B000000, STEP=step, A=ta, B=tb, BM=rows_bm, **common)
    else:
        _fused_kernel[grid](x2d, raw, y, out, cnt, split, m, n, k, x2d.stride(0), y.stride(-2),
                            raw.stride(0), per_split, 0x4B000000, STEP=FUSED_TYPES[name], BM=bm,
                            **common)
    return _add_partials(y, out, m * n, split, count, out_dtype)


def _add_partials(y: torch.Tensor, out: torch.Tensor, total: int, split: int,
                  count: torch.Tensor | None, out_dtype) -> torch.Tensor:
    """``out``, once a second kernel has added the K-split partials (if the first did not)."""
    if split > 1 and count is None:
        _reduce_kernel[(triton.cdiv(total, 1024),)](y, out, total, SPLIT=split, OUT=out_dtype,
                                                    SOFT=soft_bf16(), BLOCK=1024, num_warps=4)
    return out
