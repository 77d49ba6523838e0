"""Pieces shared by the fused small-M matmul kernels (:mod:`._chunked`, :mod:`._gemv`,
:mod:`._row`).

Loads of 16/32-bit units and float16 scales, codes to floats by their bit patterns, the Q4_K/Q5_K
super-block head, and the end of a kernel: storing one-row / few-row tiles and adding K-split
partial sums (in the kernel by the tile's last program, :func:`_finish_split`, or by the second
kernel :func:`_reduce_kernel`; the same order, so the same bits).

Imports triton at the top: reached only through :mod:`ggufvideo.kernels`.
"""

from __future__ import annotations

from ._decode import tl, to_out, triton

#: K consumed per loop step.
BK = 256


# -- loads -----------------------------------------------------------------------------------------

@triton.jit
def _w32(p):
    """32-bit little-endian words at byte pointers ``p`` (4-byte aligned), as int32."""
    return tl.load(p.to(tl.pointer_type(tl.int32)))


@triton.jit
def _half(p):
    """A float16 at a 2-byte aligned byte pointer, as float32 (exact)."""
    return tl.load(p.to(tl.pointer_type(tl.float16))).to(tl.float32)


@triton.jit
def _bits_to_f32(h):
    """The float16 whose bit pattern is the low 16 bits of int32 ``h``, as float32."""
    return (h & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _to_f32(u, magic):
    """Non-negative int32 ``u`` < 2**23 as float32, exactly, without a conversion instruction.

    ``magic | u`` with ``magic`` = 0x4B000000 is the bit pattern of the float32 ``2**23 + u``.
    Integer -> float conversion runs at a quarter of the FMA rate, which bounds a decode-heavy
    loop; ``magic`` is a run-time argument so that LLVM cannot turn the trick back into one.
    """
    return (u | magic).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _byte(word, k: tl.constexpr):
    """Byte ``k`` (0..3) of int32 words, as 0..255."""
    return (word >> (8 * k)) & 255


@triton.jit
def _k4_head(bp, F_D: tl.constexpr, F_SC: tl.constexpr):
    """Q4_K/Q5_K super-block head: ``d``, ``dmin`` (float32) and the 12 scale bytes as 3 words."""
    head = _w32(bp + F_D)
    return (_bits_to_f32(head), _bits_to_f32(head >> 16), _w32(bp + F_SC), _w32(bp + F_SC + 4),
            _w32(bp + F_SC + 8))


@triton.jit
def _k4_affine(d, dmin, s0, s1, s2, s: tl.constexpr, magic):
    """Sub-block ``s``'s weights as ``D * code + MB``: returns ``(D, MB)`` =
    (d * scale, -dmin * min).

    The six-bit scale and min are packed in 12 bytes (words ``s0..s2``): s < 4 takes bytes s and
    s+4; s >= 4 takes the nibbles of byte s+4 and the top two bits of bytes s-4 (scale) and s (min).
    """
    if s < 4:
        sc = _byte(s0, s) & 63
        mn = _byte(s1, s) & 63
    else:
        sc = (_byte(s2, s - 4) & 15) | ((_byte(s0, s - 4) >> 6) << 4)
        mn = (_byte(s2, s - 4) >> 4) | ((_byte(s1, s - 4) >> 6) << 4)
    return d * _to_f32(sc, magic), -(dmin * _to_f32(mn, magic))


# -- the end of a kernel: stores and K-split sums ------------------------------------------------

@triton.jit
def _finish_split(part, out, count, n_split, plane, offs, mask, OUT: tl.constexpr,
                  SOFT: tl.constexpr):
    """After this program stored its float32 partial sums: the last of a tile's K splits adds them.

    ``part`` is the (n_split, M, N) partial buffer, ``plane`` = M * N, ``offs`` the tile's
    element offsets in one plane, ``count`` its arrival counter (zero before the call, zero again
    after). The partials are added in split order whatever order the programs finish in, so the
    result is bit for bit the one :func:`_reduce_kernel` gives -- without a second launch.
    """
    # Every thread's stores are issued before one thread counts the arrival with release
    # semantics; the last arrival acquires, and the barrier inside the scalar atomic orders the
    # other threads' loads after it. ".cg" reads from L2, where the other programs' sums are.
    tl.debug_barrier()
    arrived = tl.atomic_add(count, 1, sem="acq_rel", scope="gpu")
    if arrived == n_split - 1:
        total = tl.load(part + offs, mask=mask, other=0.0, cache_modifier=".cg")
        for i in range(1, n_split):
            total += tl.load(part + i * plane + offs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(out + offs, to_out(total, OUT, SOFT), mask=mask)
        tl.atomic_xchg(count, 0)  # ready for the slot's next use


@triton.jit
def _row_offsets(M, stride_xm):
    """Element offsets of activation rows 1, 2, 3 from row 0 for the few-row kernels; rows past
    M re-read row M - 1 (in bounds; their outputs are not stored)."""
    return (tl.minimum(1, M - 1).to(tl.int64) * stride_xm,
            tl.minimum(2, M - 1).to(tl.int64) * stride_xm,
            tl.minimum(3, M - 1).to(tl.int64) * stride_xm)


@triton.jit
def _put_row(acc, y, i: tl.constexpr, M, N, pid_k, rn, OUT: tl.constexpr, PARTIAL: tl.constexpr,
             SOFT: tl.constexpr):
    """Activation row ``i``: sum each thread's tile ``acc`` into outputs ``rn`` and store them
    (rows past M are dropped) -- or, with K split, this split's float32 partial sums."""
    total = tl.sum(tl.sum(acc, axis=2), axis=1)
    ok = (rn < N) & (i < M)
    if not PARTIAL:
        tl.store(y + i * N + rn, to_out(total, OUT, SOFT), mask=ok)
    else:
        tl.store(y + (pid_k * M + i).to(tl.int64) * N + rn, total, mask=ok)


@triton.jit
def _store_rows(acc, y, out, count, n_split, pid_k, M, N, rn, BM: tl.constexpr,
                OUT: tl.constexpr, PARTIAL: tl.constexpr, FIXUP: tl.constexpr,
                SOFT: tl.constexpr):
    """End of a one-row / few-row kernel: activation rows 0..BM-1 from the per-thread tiles
    ``acc[0..3]`` (see :func:`_put_row`); with K split, the tile's last split adds the partial
    sums where FIXUP (``count`` its arrival counter)."""
    _put_row(acc[0], y, 0, M, N, pid_k, rn, OUT, PARTIAL, SOFT)
    if BM > 1:
        _put_row(acc[1], y, 1, M, N, pid_k, rn, OUT, PARTIAL, SOFT)
    if BM > 2:
        _put_row(acc[2], y, 2, M, N, pid_k, rn, OUT, PARTIAL, SOFT)
        _put_row(acc[3], y, 3, M, N, pid_k, rn, OUT, PARTIAL, SOFT)
    if PARTIAL and FIXUP:
        m = tl.arange(0, BM)[:, None]
        _finish_split(y, out, count, n_split, M * N, m * N + rn[None, :],
                      (m < M) & (rn < N)[None, :], OUT, SOFT)


@triton.jit
def _reduce_kernel(part, out, total, SPLIT: tl.constexpr, OUT: tl.constexpr, SOFT: tl.constexpr,
                   BLOCK: tl.constexpr):
    """``out = sum(part[0..SPLIT))`` in a fixed order (deterministic), rounded once to ``OUT``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.load(part + offs, mask=mask, other=0.0)
    for i in tl.static_range(1, SPLIT):
        acc += tl.load(part + i * total + offs, mask=mask, other=0.0)
    tl.store(out + offs, to_out(acc, OUT, SOFT), mask=mask)
