"""Streaming the parts of a pipeline one after another under one budget.

A video pipeline runs its parts in turn: the text encoder, then the transformer (Wan 2.2 A14B:
the high-noise expert, then the low-noise one), then the VAE. :func:`stream_pipeline` gives each
part the whole budget while it runs and nothing while it does not: when a part is called, the part
that ran before is put back on the host (:meth:`OffloadHandle.remove`: its resident groups and
streaming slots leave the device) and the called part is set up with :func:`~.offload.offload`
under the budget. So at most one part's weights are on the device at a time, like diffusers'
``enable_model_cpu_offload`` but with each part itself streamed when it does not fit.

The switch is triggered by a forward pre-hook on each part and, for the VAE's ``encode`` /
``decode`` (which do not go through ``forward``), by the ``_hf_hook.pre_forward`` that diffusers'
``apply_forward_hook`` calls. The same ``_hf_hook`` carries ``execution_device``, which is how
diffusers pipelines (``_execution_device``, ``get_module_execution_device``) learn that inputs
belong on the GPU although the weights sit on the host.

Costs: each switch moves the called part's resident groups to the device and page-locks its
streamed weights (``cudaHostRegister``), and unlocks the previous part's. A generation switches
about four times (encoder, expert(s), VAE), not per step: WanPipeline runs all the encoder calls,
then all the denoising steps of one expert before the other, then the VAE.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..loader import resolve_device
from ._backends import SyncBackend
from ._groups import parse_budget
from .offload import OffloadHandle, offload

__all__ = ["PartSequence", "stream_pipeline", "PIPELINE_PARTS"]

#: The parts of a diffusers video pipeline that are streamed, in the order they usually run.
PIPELINE_PARTS = ("text_encoder", "image_encoder", "transformer", "transformer_2", "vae")


#: Methods besides ``forward`` that run a part (diffusers VAEs); wrapped on the instance so that
#: they switch parts even where diffusers' ``apply_forward_hook`` is inert (no accelerate).
_ENTRY_METHODS = ("encode", "decode")


def _entry(sequence: PartSequence, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        sequence.activate(name)
        return method(*args, **kwargs)

    run._ggufvideo_entry = True  # type: ignore[attr-defined]
    run.__doc__ = method.__doc__
    return run


class _PartHook:
    """What diffusers looks for in ``module._hf_hook``: the execution device, and ``pre_forward``
    (called by ``apply_forward_hook`` before the VAE's ``encode``/``decode``)."""

    def __init__(self, sequence: PartSequence, name: str) -> None:
        self.sequence, self.name = sequence, name
        self.execution_device = sequence.device

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.sequence.activate(self.name)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return output

    def init_hook(self, module: nn.Module) -> nn.Module:
        return module

    def detach_hook(self, module: nn.Module) -> nn.Module:
        """accelerate's ``remove_hook_from_module`` (diffusers' ``remove_all_hooks``) calls this."""
        self.sequence.detach(self.name, _accelerate=True)  # accelerate deletes _hf_hook itself
        return module


def _has_offload_hooks(module: nn.Module) -> bool:
    """accelerate's hooks (``_hf_hook``) or diffusers' group offloading on ``module``."""
    if any(hasattr(m, "_hf_hook") for m in module.modules()):
        return True
    try:
        from diffusers.hooks.group_offloading import _get_group_onload_device
    except ImportError:
        return False
    try:
        _get_group_onload_device(module)
    except ValueError:
        return False
    return True


class PartSequence:
    """Parts that take the device in turn, each streamed with :func:`offload` under ``budget``.

    Args:
        parts: name -> module, e.g. ``{"text_encoder": te, "transformer": t}``; weights on the
            host (or the device: they are brought back at the first switch).
        device: where they compute.
        budget: device bytes for one part's weights (``"8GiB"``); each part gets all of it while
            it runs.
        prefetch: passed to :func:`offload`.
        backend: a factory ``device -> backend`` for :func:`offload` (tests pass a recording one);
            ``None``: CUDA streams. Without it the device must be a CUDA device.

    Attributes:
        active: the name of the part whose weights are on the device, or ``None``.
        handle: that part's :class:`OffloadHandle`.
        switches: ``(from, to)`` for every switch so far (for tests and tracing).
    """

    def __init__(self, parts: Mapping[str, nn.Module], device: torch.device | str,
                 budget: int | float | str, *, prefetch: int = 1,
                 backend: Callable[[torch.device], SyncBackend] | None = None) -> None:
        dev = torch.device(device)
        if backend is None and (dev.type != "cuda" or not torch.cuda.is_available()):
            why = ("CUDA is not available in this PyTorch" if dev.type == "cuda"
                   else f"the device is {str(dev)!r}")
            raise RuntimeError(f"ggufvideo.runtime.sequence: a VRAM budget streams weights to a "
                               f"CUDA GPU, but {why}; drop the budget (vram_budget / "
                               "--vram-budget) or run on a CUDA device")
        dev = resolve_device(dev)
        self.device = dev
        self.budget = parse_budget(budget)
        self.prefetch = prefetch
        self._backend = backend
        self.parts = {name: m for name, m in parts.items() if m is not None}
        self.active: str | None = None
        self.handle: OffloadHandle | None = None
        self.switches: list[tuple[str | None, str]] = []
        self._hooks: dict[str, Any] = {}
        for name, module in self.parts.items():
            if _has_offload_hooks(module):
                raise ValueError(f"ggufvideo.runtime.sequence: the {name} already has an "
                                 "accelerate/diffusers offload hook (enable_model_cpu_offload, "
                                 "enable_sequential_cpu_offload or group offloading); use either "
                                 "those or a VRAM budget, not both")
        for name, module in self.parts.items():
            hook = _PartHook(self, name)
            module._hf_hook = hook  # type: ignore[assignment]
            self._hooks[name] = module.register_forward_pre_hook(
                lambda m, args, _n=name: self.activate(_n))
            for method in _ENTRY_METHODS:  # a VAE's encode/decode do not call forward
                if callable(getattr(module, method, None)) and method not in module.__dict__:
                    setattr(module, method, _entry(self, name, getattr(module, method)))

    def activate(self, name: str) -> None:
        """Make ``name`` the part on the device (no-op when it already is)."""
        if self.active == name:
            return
        # Slots and device copies must be ordinary tensors even when the pipeline runs under
        # torch.inference_mode(): a later call outside it copies into them.
        previous = self.active
        with torch.inference_mode(False), torch.no_grad():
            self._deactivate()
            be = self._backend(self.device) if self._backend is not None else None
            try:
                self.handle = offload(self.parts[name], self.device, self.budget,
                                      prefetch=self.prefetch, backend=be)
            except ValueError as exc:
                raise ValueError(f"ggufvideo.runtime.sequence: the {name} "
                                 f"({type(self.parts[name]).__name__}): {exc}") from None
        self.switches.append((previous, name))
        self.active = name

    def _deactivate(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
            self.active = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # give the freed slots back before the next part's

    def detach(self, name: str, *, _accelerate: bool = False) -> None:
        """Stop sequencing ``name`` (its weights go back to the host if it was active)."""
        if self.active == name:
            self._deactivate()
        hook = self._hooks.pop(name, None)
        if hook is not None:
            hook.remove()
        module = self.parts.pop(name, None)
        for method in _ENTRY_METHODS:
            if module is not None and getattr(module.__dict__.get(method), "_ggufvideo_entry",
                                              False):
                del module.__dict__[method]
        if (module is not None and not _accelerate
                and isinstance(getattr(module, "_hf_hook", None), _PartHook)):
            del module._hf_hook

    def remove(self) -> None:
        """Take every hook off; all weights end on the host, as before."""
        for name in list(self.parts):
            self.detach(name)


def stream_pipeline(pipe: Any, device: torch.device | str = "cuda",
                    budget: int | float | str = "8GiB", *, parts: tuple[str, ...] = PIPELINE_PARTS,
                    prefetch: int = 1,
                    backend: Callable[[torch.device], SyncBackend] | None = None) -> PartSequence:
    """Stream a diffusers pipeline's parts to ``device`` one at a time, each under ``budget``.

    The parts named in ``parts`` that the pipeline has (text encoder, image encoder, each Wan
    transformer / Wan 2.2 expert, VAE) must have their weights on the host; see
    :class:`PartSequence`. ``pipe._ggufvideo_stream`` is the returned sequence
    (``.remove()`` undoes it).

    Raises:
        RuntimeError: ``device`` is not a CUDA device or CUDA is not available (unless a test
            backend is given).
        ValueError: a part already has accelerate/diffusers offload hooks.
    """
    found = {name: getattr(pipe, name, None) for name in parts}
    modules = {name: m for name, m in found.items() if isinstance(m, nn.Module)}
    seq = PartSequence(modules, device, budget, prefetch=prefetch, backend=backend)
    pipe._ggufvideo_stream = seq
    return seq
