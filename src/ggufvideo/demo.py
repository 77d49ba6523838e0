"""``ggufvideo demo``: convert, inspect, load and run a small real video model; no download.

The model is diffusers' ``WanTransformer3DModel`` built from a small config with random weights
when diffusers is installed (the ``demo`` extra: ``pip install -e ".[demo]"``), else
:class:`TinyVideoDiT`, a built-in transformer with Wan's layout (Conv3d patch embedding, self/cross
attention, FFN, modulation, head). The demo writes the model as safetensors, converts it to a few
GGUF types, inspects one, loads each lazily (weights stay quantized in memory) and runs a forward
pass, then prints: type, file size, weight memory, relative error against full
precision, forward time.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .model import parameter_bytes
from .writer import format_bytes

__all__ = ["run_demo", "build_demo_model", "TinyVideoDiT", "DemoRow", "DEFAULT_TYPES"]

DEFAULT_TYPES: tuple[str, ...] = ("Q8_0", "Q5_K_M", "Q4_K_M")


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, ctx_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(ctx_dim or dim, dim)
        self.v = nn.Linear(ctx_dim or dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if ctx is None else ctx
        b, n, d = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.norm_k(self.k(ctx)).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v(ctx).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, ffn: int, heads: int) -> None:
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = _Attention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        m = (self.modulation + e).chunk(6, dim=1)
        x = x + self.self_attn(self.norm1(x) * (1 + m[1]) + m[0]) * m[2]
        x = x + self.cross_attn(self.norm3(x), ctx)
        return x + self.ffn(self.norm2(x) * (1 + m[4]) + m[3]) * m[5]


class TinyVideoDiT(nn.Module):
    """A small video diffusion transformer with Wan's layout and key names (built-in fallback).

    Input ``(b, c, t, h, w)`` latents, a timestep per sample, text embeddings ``(b, n, text_dim)``;
    output the same shape as the latents.
    """

    def __init__(self, dim: int = 256, ffn: int = 1024, heads: int = 2, layers: int = 2,
                 in_channels: int = 16, text_dim: int = 256, freq_dim: int = 256,
                 patch: tuple[int, int, int] = (1, 2, 2)) -> None:
        super().__init__()
        self.patch, self.freq_dim, self.out_channels = patch, freq_dim, in_channels
        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(),
                                            nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(_Block(dim, ffn, heads) for _ in range(layers))
        self.head = nn.Module()
        self.head.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.head.head = nn.Linear(dim, in_channels * math.prod(patch))
        self.head.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def _sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = hidden_states.shape
        pt, ph, pw = self.patch
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        e = self.time_embedding(self._sinusoid(timestep).to(x.dtype))
        e6 = self.time_projection(e).unflatten(1, (6, -1))
        ctx = self.text_embedding(encoder_hidden_states)
        for block in self.blocks:
            x = block(x, e6, ctx)
        m = (self.head.modulation + e[:, None]).chunk(2, dim=1)
        x = self.head.head(self.head.norm(x) * (1 + m[1]) + m[0])  # type: ignore[operator]
        x = x.view(b, t // pt, h // ph, w // pw, c, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, t, h, w)


def build_demo_model(*, builtin: bool = False, seed: int = 0
                     ) -> tuple[Callable[[], nn.Module], dict[str, torch.Tensor], str]:
    """(model factory, forward inputs, description). Same seed, same weights and inputs."""
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {"hidden_states": torch.randn(1, 16, 2, 16, 16, generator=g),
              "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, 16, 256, generator=g)}
    factory: Callable[[], nn.Module] | None = None
    desc = ""
    if not builtin:
        try:
            from diffusers import WanTransformer3DModel
        except ImportError:
            pass
        else:
            def factory() -> nn.Module:
                torch.manual_seed(seed)
                return WanTransformer3DModel(  # type: ignore[no-any-return,return-value]
                    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128,
                    in_channels=16, out_channels=16, text_dim=256, freq_dim=256, ffn_dim=1024,
                    num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                    eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)

            desc = "diffusers WanTransformer3DModel (dim 256, 2 layers, random weights)"
    if factory is None:
        def factory() -> nn.Module:
            torch.manual_seed(seed)
            return TinyVideoDiT()

        desc = "built-in TinyVideoDiT (Wan layout, dim 256, 2 layers, random weights)"
    return factory, inputs, desc


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        out = model(**inputs, return_dict=False) if _is_diffusers(model) else model(**inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _is_diffusers(model: nn.Module) -> bool:
    return type(model).__module__.startswith("diffusers")


def _load_lazy(path: str, factory: Callable[[], nn.Module]) -> nn.Module:
    """The model with weights from ``path`` kept quantized (decoded layer by layer in forward)."""
    from .model import empty_weights, load_model

    with empty_weights():  # parameters on meta: no full-precision copy is ever built
        model = factory()
    return load_model(model, path, lazy=True).eval()


def _time_forward(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int
                  ) -> tuple[torch.Tensor, float]:
    out = _forward(model, inputs)  # warm-up (and the output)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _forward(model, inputs)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _save_source(model: nn.Module, folder: str) -> str:
    """The full-precision checkpoint the demo converts (safetensors if installed, else .pt)."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        path = os.path.join(folder, "model-F32.pt")
        torch.save(sd, path)
        return path
    path = os.path.join(folder, "model-F32.safetensors")
    save_file(sd, path)
    return path


@dataclass
class DemoRow:
    """One line of the demo's table."""

    type: str
    file_size: int
    weight_bytes: int
    rel_error: float
    forward_s: float


def run_demo(types: Sequence[str] = DEFAULT_TYPES, *, builtin: bool = False,
             workdir: str | None = None, repeats: int = 3, log: Callable[[str], None] = print,
             progress: bool = False, generate: bool = True) -> list[DemoRow]:
    """Run the demo and print its table; returns the rows (first row: full precision).

    ``workdir``: keep the files there (``None``: a temporary folder, removed at the end).
    ``progress``: show each conversion's progress bar (on stderr).
    ``generate``: then run the whole ``ggufvideo generate`` path on tiny models (text encoder,
    transformer and VAE written as GGUF, a pipeline built from the files, a few frames written;
    see :mod:`ggufvideo.demo_generate`) when diffusers and transformers are installed.
    """
    # Scoped, not global: the demo is also called in-process (tests, notebooks).
    with torch.no_grad():
        rows = _run_demo(types, builtin=builtin, workdir=workdir, repeats=repeats, log=log,
                         progress=progress)
    if generate:
        _run_generate(workdir, log)
    return rows


def _run_generate(workdir: str | None, log: Callable[[str], None]) -> None:
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        log("\n(skipping generation: needs diffusers and transformers: pip install "
            "'ggufvideo[demo]')")
        return
    from .demo_generate import run_generate_demo

    log("\ngenerate: UMT5 text encoder + Wan transformer + Wan VAE, each a GGUF file")
    ctx = tempfile.TemporaryDirectory(prefix="ggufvideo-generate-") if workdir is None else None
    folder = ctx.name if ctx is not None else workdir
    assert folder is not None
    os.makedirs(folder, exist_ok=True)
    try:
        run_generate_demo(folder, log=log)
    finally:
        if ctx is not None:
            ctx.cleanup()
            log("(the generated files were in a temporary folder, now removed; pass "
                "--keep-files DIR to keep them)")


def _run_demo(types: Sequence[str], *, builtin: bool, workdir: str | None, repeats: int,
              log: Callable[[str], None], progress: bool) -> list[DemoRow]:
    from .convert import convert
    from .inspection import format_inspection, inspect_file

    factory, inputs, desc = build_demo_model(builtin=builtin)
    log(f"model: {desc}")
    ref_model = factory().eval()
    ref, ref_t = _time_forward(ref_model, inputs, repeats)
    rows = [DemoRow("F32 (source)", 0, parameter_bytes(ref_model), 0.0, ref_t)]

    ctx = tempfile.TemporaryDirectory(prefix="ggufvideo-demo-") if workdir is None else None
    folder = ctx.name if ctx is not None else workdir
    assert folder is not None
    os.makedirs(folder, exist_ok=True)
    if ctx is not None:
        log(f"working in a temporary folder, removed at the end ({folder}); "
            "--keep-files DIR keeps the files")
    try:
        src = _save_source(ref_model, folder)
        rows[0].file_size = os.path.getsize(src)
        del ref_model
        for i, qtype in enumerate(types):
            dst = os.path.join(folder, f"model-{qtype}.gguf")
            log(f"converting to {qtype} ...")
            summary = convert(src, dst, qtype=qtype, force=True, progress=progress)
            counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts().items()))
            log(f"converted {qtype}: {format_bytes(summary.bytes_out)} ({counts}) in "
                f"{summary.seconds:.1f} s")
            if i == len(types) - 1:
                log("")
                log(format_inspection(inspect_file(dst), tensors=False))
                log("")
            model = _load_lazy(dst, factory)
            out, t = _time_forward(model, inputs, repeats)
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            rows.append(DemoRow(qtype, os.path.getsize(dst), parameter_bytes(model), err, t))
            del model
    finally:
        if ctx is not None:
            ctx.cleanup()
    log(format_table(rows))
    if ctx is not None:
        log("(the files above were temporary and are now removed; run with --keep-files DIR "
            "to keep them)")
    else:
        log(f"files kept in {folder}")
    return rows


def format_table(rows: Sequence[DemoRow]) -> str:
    """The demo's table as text."""
    head = (f"{'type':<13} {'file size':>11} {'weights in RAM':>15} {'rel. error':>11} "
            f"{'forward':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.type:<13} {format_bytes(r.file_size):>11} "
                     f"{format_bytes(r.weight_bytes):>15} "
                     f"{r.rel_error:>11.2e} {r.forward_s * 1e3:>8.1f} ms")
    return "\n".join(lines)
