"""Triton dequantization: ggml blocks -> float32/float16/bfloat16, bit-identical to the torch path.

Imports triton at the top: reached only through :mod:`ggufvideo.kernels`, never at package import.
"""

from __future__ import annotations

import os
from functools import cache

import torch

from ..errors import QuantizationError, UnsupportedTypeError
from ..quants import get_quant_type
from ..quants._bits import IQ4_KVALUES
from ._decode import PARTS, SPECS, decode_tile, tl, to_out, triton

__all__ = ["KernelSpec", "kernel_spec", "dequantize_into", "iq4_table", "TL_DTYPES"]

def soft_bf16() -> bool:
    """Whether kernels run under Triton's interpreter (whose bfloat16 cast is not exact)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


class KernelSpec:
    """What a kernel needs to know about one type, all read from the registry's layout."""

    def __init__(self, name: str) -> None:
        qt = get_quant_type(name)
        decode, ns, sl, fields = SPECS[name]
        if ns * sl != qt.block_size:
            raise AssertionError(f"{name}: decoder tile {ns}x{sl} != block size {qt.block_size}")
        self.qtype = qt.qtype
        self.name = name
        self.decode = decode
        self.block_size: int = qt.block_size
        self.type_size: int = qt.type_size()
        self.ns, self.sl = ns, sl
        offsets = [qt.layout[f].offset for f in fields]
        self.offsets: tuple[int, ...] = tuple(offsets + [0] * (5 - len(offsets)))

    def constexprs(self) -> dict[str, object]:
        """Keyword arguments that configure a kernel for this type."""
        f0, f1, f2, f3, f4 = self.offsets
        return dict(DECODE=self.decode, TS=self.type_size, NS=self.ns, SL=self.sl,
                    F0=f0, F1=f1, F2=f2, F3=f3, F4=f4)


@cache
def kernel_spec(name: str) -> KernelSpec:
    """The :class:`KernelSpec` of a type name; :class:`UnsupportedTypeError` if no kernel."""
    if name not in SPECS:
        raise UnsupportedTypeError(f"no Triton kernel for ggml type {name}; supported: "
                                   f"{', '.join(SPECS)}")
    return KernelSpec(name)


_KV: dict[torch.device, torch.Tensor] = {}


def iq4_table(device: torch.device) -> torch.Tensor:
    """The IQ4 codebook as float32 on ``device`` (a kernel argument; also a dummy for others)."""
    t = _KV.get(device)
    if t is None:
        t = torch.tensor(IQ4_KVALUES, dtype=torch.float32, device=device)
        _KV[device] = t
    return t


@triton.jit
def _dequant_kernel(src, dst, KV, n_blocks,
                    DECODE: tl.constexpr, TS: tl.constexpr, NS: tl.constexpr, SL: tl.constexpr,
                    F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
                    F4: tl.constexpr, BB: tl.constexpr, OUT: tl.constexpr,
                    SOFT_BF16: tl.constexpr):
    BS: tl.constexpr = NS * SL
    pid = tl.program_id(0)
    # 64-bit base offsets (a tensor may exceed 2**31 elements), 32-bit offsets inside the tile.
    first = pid.to(tl.int64) * BB
    src = src + first * TS
    dst = dst + first * BS
    left = n_blocks - first
    rows = tl.arange(0, BB)
    # Loads of a partial last tile re-read its last block (always in bounds); stores are masked.
    bp = (src + tl.minimum(rows, left - 1) * TS)[:, None, None]
    vals = decode_tile(DECODE, bp, NS, SL, F0, F1, F2, F3, F4, KV)
    offs = rows[:, None] * BS + tl.arange(0, BS)[None, :]
    tl.store(dst + offs, to_out(vals, OUT, SOFT_BF16), mask=(rows < left)[:, None])


@triton.jit
def _dequant_parts_kernel(src, dst, KV, n_blocks,
                          PARTS_FN: tl.constexpr, RANK: tl.constexpr, TS: tl.constexpr,
                          BS: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr,
                          F2: tl.constexpr, F3: tl.constexpr, F4: tl.constexpr,
                          BB: tl.constexpr, OUT: tl.constexpr, SOFT_BF16: tl.constexpr):
    # As _dequant_kernel, with a storage-order decoder: two value tiles per byte tile, each stored
    # where its elements belong (runs of 16 contiguous elements: still wide stores).
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * BB
    src = src + first * TS
    dst = dst + first * BS
    left = n_blocks - first
    rows = tl.arange(0, BB)[:, None, None]
    bp = src + tl.minimum(rows, left - 1) * TS
    w0, w1, idx, HI = PARTS_FN(bp, F0, F1, F2, F3, F4, KV)
    dp = dst + rows * BS
    mask = rows < left
    if RANK == 4:
        dp = tl.expand_dims(dp, 3)
        mask = tl.expand_dims(mask, 3)
    tl.store(dp + idx, to_out(w0, OUT, SOFT_BF16), mask=mask)
    tl.store(dp + idx + HI, to_out(w1, OUT, SOFT_BF16), mask=mask)


#: Elements each program decodes, and its warps (the setting benchmarks/gpu_dequant.py measured).
TILE_ELEMENTS = 4096
NUM_WARPS = 4


def dequantize_into(raw: torch.Tensor, name: str, out: torch.Tensor, *,
                    tile_elements: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Decode the contiguous blocks of ``raw`` (uint8) into contiguous ``out`` (same element count).

    ``out``'s dtype (float32, float16 or bfloat16) is the output type. No checks beyond sizes: the
    public wrappers in :mod:`ggufvideo.kernels` validate.
    """
    spec = kernel_spec(name)
    if out.dtype not in TL_DTYPES:
        raise QuantizationError(f"dequantize({name}): output dtype must be float32, float16 or "
                                f"bfloat16, got {out.dtype}")
    n_blocks = raw.numel() // spec.type_size
    if raw.numel() != n_blocks * spec.type_size or out.numel() != n_blocks * spec.block_size:
        raise QuantizationError(
            f"dequantize({name}): {raw.numel()} bytes / {out.numel()} outputs are not a whole "
            f"number of {spec.type_size}-byte, {spec.block_size}-element blocks")
    if n_blocks == 0:
        return out
    bb = max(1, (tile_elements or TILE_ELEMENTS) // spec.block_size)
    grid = (triton.cdiv(n_blocks, bb),)
    if name in PARTS:
        parts_fn, rank = PARTS[name]
        f0, f1, f2, f3, f4 = spec.offsets
        _dequant_parts_kernel[grid](raw, out, iq4_table(raw.device), n_blocks, PARTS_FN=parts_fn,
                                    RANK=rank, TS=spec.type_size, BS=spec.block_size, F0=f0, F1=f1,
                                    F2=f2, F3=f3, F4=f4, BB=bb, OUT=TL_DTYPES[out.dtype],
                                    SOFT_BF16=soft_bf16(), num_warps=num_warps or NUM_WARPS,
                                    enable_fp_fusion=False)
        return out
    _dequant_kernel[grid](raw, out, iq4_table(raw.device), n_blocks, BB=bb,
                          OUT=TL_DTYPES[out.dtype], SOFT_BF16=soft_bf16(),
                          num_warps=num_warps or NUM_WARPS, enable_fp_fusion=False,
                          **spec.constexprs())
    return out
