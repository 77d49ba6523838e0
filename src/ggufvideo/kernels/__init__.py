"""GPU fast path: Triton dequantization and fused quantized matmul, registered as torch custom ops.

Optional: needs the ``triton`` extra and a CUDA device. Importing this package imports torch
only; triton is imported the first time a kernel runs. The torch decoders in
:mod:`ggufvideo.quants` stay the reference: the kernels' float32 output is bit-identical to them
and their float16/bfloat16 output is the same exact value rounded once.

Public functions:

* :func:`is_available` -- whether the fast path would run on a device (CUDA, triton importable,
  not switched off).
* :func:`dequantize` -- ``torch.ops.ggufvideo.dequantize``: raw blocks -> a new dense tensor.
* :func:`linear` -- ``torch.ops.ggufvideo.quant_linear``: ``F.linear`` with a quantized weight.
  The weight is decoded into a workspace reused across calls and the vendor GEMM (``F.linear``)
  runs on it. Calls with few rows of activations take the fused kernel instead
  (:mod:`ggufvideo.kernels._matmul`): it reads the quantized weight once and never materializes
  it. It runs up to the device's ``fused_rows`` per type (:mod:`ggufvideo.kernels.settings`: on
  H100/H200 :data:`FUSED_ROWS`, where it beat decode + cuBLAS; on GPUs nobody tuned, never),
  capped by :func:`fused_max_m`; at M = 1 it also beats bf16 ``F.linear`` for the 4- and 5-bit
  types (numbers: README, ``benchmarks/gpu_linear.py``). ``GGUFVIDEO_FUSED_MAX_M=0`` or
  :func:`set_fused_max_m` ``(0)`` turns it off.

The switch: ``GGUFVIDEO_NO_TRITON=1`` in the environment, or :func:`set_enabled` ``(False)``,
makes :func:`is_available` false, so the quant-aware layers (:mod:`ggufvideo.ops`) take the torch
path. Both ops are ``torch.library`` custom ops with fake (meta) implementations, so
``torch.compile(fullgraph=True)`` traces them as single nodes and CUDA graphs can capture them
(no host synchronisation, no allocation outside torch's caching allocator).

Environment switches (``GGUFVIDEO_NO_TRITON``: ``1``/``true``/``yes``/``on`` or
``0``/``false``/``no``/``off``/empty; ``GGUFVIDEO_FUSED_MAX_M``: an integer in 0..64) are each read
once, at their first use, and kept; a value outside those raises ``ValueError`` naming the variable
and the accepted values. :func:`set_enabled` and :func:`set_fused_max_m` change them at run time.
"""

from __future__ import annotations

import importlib.util
import os
import threading

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from ..errors import QuantizationError
from ..quants import get_quant_type, to_qtype
from . import settings as _settings

__all__ = [
    "DEQUANT_TYPES",
    "FUSED_TYPES",
    "FUSED_MAX_M",
    "FUSED_ROWS",
    "fused_max_m",
    "set_fused_max_m",
    "is_available",
    "set_enabled",
    "dequantize",
    "linear",
    "release_workspace",
    "lora_up_add",
    "LORA_MAX_RANK",
]

#: Types with a Triton dequantization kernel.
DEQUANT_TYPES: frozenset[str] = frozenset(
    ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL",
     "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"))
#: Types with a fused small-M dequant+matmul kernel.
FUSED_TYPES: frozenset[str] = frozenset(("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"))
#: The most activation rows the fused kernel can take (its largest activation tile).
FUSED_MAX_M = 64
#: Per type, the most rows for which the fused kernel beat decode + cuBLAS on an H100 (Wan-14B
#: shapes, CUDA-graph timings in benchmarks/gpu_results_h100.md): past 16 rows the tensor-core
#: branch decodes more per byte than the 4/5-bit K-quants need, and loses for the others. These
#: are the sm_90 (H100/H200) values; a call reads its device's settings
#: (:func:`ggufvideo.kernels.settings.settings_for`), and on GPUs nobody tuned no call is fused.
FUSED_ROWS: dict[str, int] = _settings.FUSED_ROWS
_fused_max_m: int | None = None  # None: follow GGUFVIDEO_FUSED_MAX_M (default FUSED_MAX_M)

# -- environment switches: each read once, at its first use; a bad value is an error ------------
_OFF_WORDS = ("", "0", "false", "no", "off")
_ON_WORDS = ("1", "true", "yes", "on")


def _parse_no_triton(value: str) -> bool:
    word = value.strip().lower()
    if word in _OFF_WORDS or word in _ON_WORDS:
        return word in _ON_WORDS
    raise ValueError(f"GGUFVIDEO_NO_TRITON={value!r} is not an accepted value: use 1, true, yes "
                     "or on to switch the Triton path off; 0, false, no, off or empty (or unset) "
                     "to leave it on (case-insensitive)")


def _parse_fused_max_m(value: str) -> int:
    try:
        m = int(value.strip())
    except ValueError:
        m = -1
    if not 0 <= m <= FUSED_MAX_M:
        raise ValueError(f"GGUFVIDEO_FUSED_MAX_M={value!r} is not an accepted value: use an "
                         f"integer in 0..{FUSED_MAX_M} (0 turns the fused kernels off; unset: "
                         f"{FUSED_MAX_M})")
    return m


#: The environment switches, their parsers and their values when unset.
_ENV_SWITCHES = {"GGUFVIDEO_NO_TRITON": (_parse_no_triton, False),
                 "GGUFVIDEO_FUSED_MAX_M": (_parse_fused_max_m, FUSED_MAX_M)}
_ENV_VALUES: dict[str, object] = {}  # name -> parsed value, filled at each one's first use


def _env(name: str) -> object:
    """The parsed value of environment switch ``name``, read at its first use and kept.

    Changing the variable later has no effect (:func:`set_enabled` and :func:`set_fused_max_m`
    change the behaviour at run time); a value outside the accepted ones raises ``ValueError``
    naming the variable and what it accepts. ``_ENV_VALUES.clear()`` makes the next use read again
    (tests).
    """
    if name not in _ENV_VALUES:
        parse, default = _ENV_SWITCHES[name]
        raw = os.environ.get(name)
        _ENV_VALUES[name] = default if raw is None else parse(raw)
    return _ENV_VALUES[name]


def fused_max_m() -> int:
    """Calls with at most this many activation rows take the fused kernel (0: none do)."""
    if _fused_max_m is not None:
        return _fused_max_m
    return _env("GGUFVIDEO_FUSED_MAX_M")  # type: ignore[return-value]


def set_fused_max_m(m: int | None) -> None:
    """Route calls with at most ``m`` (<= :data:`FUSED_MAX_M`) rows to the fused kernel.

    ``0`` turns the fused path off, ``None`` follows ``GGUFVIDEO_FUSED_MAX_M``.
    """
    global _fused_max_m
    if m is not None and not 0 <= m <= FUSED_MAX_M:
        raise ValueError(f"fused_max_m must be in 0..{FUSED_MAX_M}, got {m}")
    _fused_max_m = m

_enabled: bool | None = None  # None: follow the environment variable


def set_enabled(flag: bool | None) -> None:
    """Force the fast path on (``True``) or off (``False``); ``None`` follows
    ``GGUFVIDEO_NO_TRITON``."""
    global _enabled
    _enabled = flag


def _switched_on() -> bool:
    if _enabled is not None:
        return _enabled
    return not _env("GGUFVIDEO_NO_TRITON")


_HAS_TRITON: bool | None = None


def _has_triton() -> bool:
    global _HAS_TRITON
    if _HAS_TRITON is None:
        _HAS_TRITON = importlib.util.find_spec("triton") is not None
    return _HAS_TRITON


def is_available(device: torch.device | str | None = None, qtype: object = None) -> bool:
    """Whether the Triton path runs for tensors on ``device`` (and of ``qtype``, if given).

    True for CUDA devices when triton is importable and the switch is on. Also true on the CPU
    under ``TRITON_INTERPRET=1`` when ``device`` is ``"cpu"`` explicitly -- that is how the tests
    exercise the kernels' logic without a GPU.
    """
    if not (_switched_on() and _has_triton()):
        return False
    if qtype is not None:
        try:
            if to_qtype(qtype).name not in DEQUANT_TYPES:  # type: ignore[arg-type]
                return False
        except (QuantizationError, TypeError, ValueError):
            return False
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return torch.cuda.is_available() and (dev is None or dev.type == "cuda")


# -- workspace for the large-M path ---------------------------------------------------------------
# One decode buffer per (device, dtype, stream), each with a lock. Kernels on one stream run in
# the order they were enqueued, so a buffer can be shared by every call on that stream -- as long as
# no other call's decode is enqueued between a call's decode and its GEMM. Host threads sharing a
# stream could do exactly that (thread A decodes, thread B decodes over it, A's GEMM reads B's
# weight), so each call holds its key's lock from taking the buffer until its GEMM is enqueued.
# Chosen over a buffer per thread: that costs a whole weight's memory per thread (hundreds of MB
# at Wan-14B sizes) and keeps dead threads' buffers until release_workspace(); the lock costs only
# host-side enqueue time, and the GPU runs one stream's work in order anyway.
_WorkspaceKey = tuple[torch.device, torch.dtype, int]
_WORKSPACE: dict[_WorkspaceKey, torch.Tensor] = {}
_WORKSPACE_LOCKS: dict[_WorkspaceKey, threading.Lock] = {}
_WORKSPACE_GUARD = threading.Lock()  # guards the two dicts themselves


def _stream_id(device: torch.device) -> int:
    return torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0


def _workspace_key(device: torch.device, dtype: torch.dtype) -> _WorkspaceKey:
    """The workspace key of calls on ``device``'s current stream."""
    return (device, dtype, _stream_id(device))


def _workspace_lock(key: _WorkspaceKey) -> threading.Lock:
    """The lock a call holds while it uses ``key``'s buffer (from :func:`_workspace` until its
    last kernel reading the buffer is enqueued)."""
    with _WORKSPACE_GUARD:
        lock = _WORKSPACE_LOCKS.get(key)
        if lock is None:
            lock = _WORKSPACE_LOCKS[key] = threading.Lock()
        return lock


def _workspace(key: _WorkspaceKey, numel: int) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, reused by every call with this key.

    The caller holds ``_workspace_lock(key)``. The buffer grows to the largest weight seen. While
    a CUDA graph is being captured it is never grown (that would allocate from the graph's private
    pool and keep a captured address alive outside it): a temporary buffer serves that call instead.
    """
    device, dtype, _ = key
    with _WORKSPACE_GUARD:
        buf = _WORKSPACE.get(key)
    if buf is not None and buf.numel() >= numel:
        return buf[:numel]
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    fresh = torch.empty(numel, dtype=dtype, device=device)
    if not capturing:
        with _WORKSPACE_GUARD:
            _WORKSPACE.pop(key, None)  # let the old buffer go before the caller fills the new one
            _WORKSPACE[key] = fresh
    return fresh


def release_workspace() -> None:
    """Drop the decode buffers of the large-M path (they are rebuilt on the next call).

    A call running meanwhile keeps its own reference until it has enqueued its GEMM.
    """
    with _WORKSPACE_GUARD:
        _WORKSPACE.clear()


# -- the custom ops ------------------------------------------------------------------------------
def _name(qtype: int) -> str:
    return GGMLQuantizationType(qtype).name


def _decode_into(raw: torch.Tensor, qtype: int, out: torch.Tensor) -> torch.Tensor:
    """Decode contiguous ``raw`` into the flat ``out``: Triton where it runs, else the torch
    path."""
    name = _name(qtype)
    if name in DEQUANT_TYPES and is_available(raw.device):
        from ._dequant import dequantize_into

        return dequantize_into(raw, name, out)
    from ..quants import dequantize as torch_dequantize

    qt = get_quant_type(qtype)
    out.copy_(torch_dequantize(raw.reshape(-1, qt.type_size()), qtype, dtype=out.dtype).reshape(-1))
    return out


@torch.library.custom_op("ggufvideo::dequantize", mutates_args=())
def _dequantize_op(raw: torch.Tensor, qtype: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(numel, dtype=dtype, device=raw.device)
    return _decode_into(raw.contiguous(), qtype, out)


@_dequantize_op.register_fake
def _(raw: torch.Tensor, qtype: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    return raw.new_empty(numel, dtype=dtype)


def _linear_impl(x: torch.Tensor, raw: torch.Tensor, qtype: int, out_features: int,
                 bias: torch.Tensor | None) -> torch.Tensor:
    name = _name(qtype)
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    raw2d = raw.reshape(out_features, -1)
    if (name in FUSED_TYPES and 0 < m <= fused_max_m() and k % 256 == 0
            and x.dtype in (torch.float16, torch.bfloat16) and is_available(x.device)
            and m <= _settings.settings_for(name, x.device).fused_rows):
        from ._matmul import fused_linear

        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        y = fused_linear(x2d, raw2d.contiguous(), name, out_features)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], out_features)
    key = _workspace_key(x.device, x.dtype)
    with _workspace_lock(key):  # decode and GEMM enqueued with no other decode in between
        w = _workspace(key, out_features * k)
        _decode_into(raw2d.contiguous(), qtype, w)
        return F.linear(x, w.view(out_features, k), None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("ggufvideo::quant_linear", mutates_args=())
def _quant_linear_op(x: torch.Tensor, raw: torch.Tensor, qtype: int, out_features: int,
                     bias: torch.Tensor | None) -> torch.Tensor:
    return _linear_impl(x, raw, qtype, out_features, bias)


@_quant_linear_op.register_fake
def _(x: torch.Tensor, raw: torch.Tensor, qtype: int, out_features: int,
      bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _linear_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, raw, qtype, out_features, bias = inputs
    ctx.save_for_backward(raw)
    ctx.qtype, ctx.n, ctx.k, ctx.x_dtype = qtype, out_features, x.shape[-1], x.dtype
    ctx.bias_shape = None if bias is None else bias.shape


def _linear_backward(ctx, grad):  # noqa: ANN001, ANN202
    # Gradients flow to the activations (and a dense bias), never to the quantized weight:
    # fine-tuning a quantized base model (LoRA) needs exactly this.
    (raw,) = ctx.saved_tensors
    w = _dequantize_op(raw, ctx.qtype, ctx.n * ctx.k, grad.dtype).view(ctx.n, ctx.k)
    grad_x = (grad @ w).to(ctx.x_dtype)
    grad_b = None
    if ctx.bias_shape is not None:
        grad_b = grad.reshape(-1, ctx.n).sum(0).reshape(ctx.bias_shape)
    return grad_x, None, None, None, grad_b


_quant_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)

#: The largest summed LoRA rank :func:`lora_up_add` takes in its kernel (larger: cuBLAS). Four
#: Wan-14B blocks at 32,760 tokens on an H200: the kernel beat ``addmm_`` at rank 32 (+1.4% vs
#: +2.9% over no LoRA) and lost at 96 and 128 (+5.0% vs +4.6%, +4.6% vs +3.1%). The kernel
#: itself takes ranks up to 256 (``_lora.MAX_RANK``).
LORA_MAX_RANK = 64


@torch.library.custom_op("ggufvideo::lora_up_add", mutates_args=("out",))
def _lora_up_add_op(out: torch.Tensor, h: torch.Tensor, up_t: torch.Tensor) -> None:
    from ._lora import up_add

    up_add(out, h, up_t)


def lora_up_add(out: torch.Tensor, h: torch.Tensor, up_t: torch.Tensor) -> None:
    """``out += h @ up_t`` in place: the LoRA up-projection added into a layer's output.

    ``out`` (M, N) and ``h`` (M, r) may have strided rows (``h`` is often extra columns of the
    same buffer as ``out``). The Triton kernel runs for float16/bfloat16 on a device where
    :func:`is_available` and r <= :data:`LORA_MAX_RANK`; otherwise ``out.addmm_(h, up_t)``. Both
    accumulate in float32 and round once.
    """
    if (out.dtype in (torch.float16, torch.bfloat16) and h.dtype == out.dtype == up_t.dtype
            and out.dim() == 2 and h.shape[1] <= LORA_MAX_RANK and out.stride(-1) == 1
            and h.stride(-1) == 1 and is_available(out.device)):
        torch.ops.ggufvideo.lora_up_add(out, h, up_t.contiguous())
    else:
        out.addmm_(h, up_t)


# -- public wrappers -----------------------------------------------------------------------------
def _check(raw: torch.Tensor, qtype: object, numel: int, where: str) -> GGMLQuantizationType:
    q = to_qtype(qtype)  # type: ignore[arg-type]
    qt = get_quant_type(q)
    if raw.dtype != torch.uint8:
        raise QuantizationError(f"{where}({q.name}): raw blocks must be uint8, got {raw.dtype}")
    if numel % qt.block_size or raw.numel() != numel // qt.block_size * qt.type_size():
        raise QuantizationError(
            f"{where}({q.name}): {numel} elements need {numel // qt.block_size * qt.type_size()} "
            f"bytes of {qt.block_size}-element blocks, got {raw.numel()} bytes")
    return q


def dequantize(raw: torch.Tensor, qtype: object, shape: tuple[int, ...] | torch.Size,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode ``raw`` (uint8 blocks, any shape) into a new tensor of ``shape`` and ``dtype``.

    Runs the Triton kernel where :func:`is_available` says so, the torch path otherwise; the
    result is the same bits either way.
    """
    shape = torch.Size(shape)
    q = _check(raw, qtype, shape.numel(), "kernels.dequantize")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise QuantizationError(f"kernels.dequantize({q.name}): dtype must be float32, float16 or "
                                f"bfloat16, got {dtype}")
    return torch.ops.ggufvideo.dequantize(raw, int(q), shape.numel(), dtype).view(shape)


def linear(x: torch.Tensor, raw: torch.Tensor, qtype: object, out_features: int,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for ``W`` the ``(out_features, x.shape[-1])`` weight in ``raw``.

    Computed in ``x.dtype``. With more than :func:`fused_max_m` rows the weight is decoded exactly,
    rounded once to ``x.dtype`` and multiplied by the vendor GEMM (bit-identical to ``F.linear``
    on the torch-decoded weight); with fewer the fused kernel multiplies by the exact weights and
    accumulates in float32 in its own order, so results agree to accumulation and output rounding,
    not bit for bit.
    """
    q = _check(raw, qtype, out_features * x.shape[-1], "kernels.linear")
    if not x.dtype.is_floating_point:
        raise QuantizationError(
            f"kernels.linear({q.name}): activations must be floating, got {x.dtype}")
    return torch.ops.ggufvideo.quant_linear(x, raw, int(q), out_features, bias)
