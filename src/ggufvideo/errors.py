"""The error hierarchy.

Every problem with a GGUF file's contents raises a :class:`GGUFError` (a ``ValueError``) whose
message names the file, the tensor when there is one, and what was expected versus what was found.
A missing file is a plain ``FileNotFoundError``, as everywhere else in Python.
"""

from __future__ import annotations

import os

__all__ = [
    "GGUFError",
    "InvalidHeaderError",
    "TensorLayoutError",
    "UnsupportedTypeError",
    "ShapeMetadataError",
    "QuantizationError",
    "ModelLoadError",
    "UnknownModelError",
    "TensorOperationError",
    "LoraError",
]


def _safe(text: object, limit: int = 200) -> str:
    """Render untrusted text (tensor names, keys, messages quoting them) printable and bounded.

    Names come from files written by strangers: ANSI escapes, newlines, NUL and other
    non-printable characters come out escaped (``\\x1b``, ``\\n``), so a file cannot move the
    cursor, recolour or fake lines in a terminal; printable text, non-ASCII letters included, is
    kept. A text longer than ``limit`` loses its middle, not its end, so a message quoting a huge
    name still says what went wrong.
    """
    s = str(text)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
    if len(s) > limit:  # cut after escaping: escapes make a text up to 10 times longer
        tail = limit // 3
        s = f"{s[:limit - tail]}...({len(s)} chars)...{s[len(s) - tail:]}"
    return s


class GGUFError(ValueError):
    """A GGUF file (or data meant for one) is malformed or unsupported.

    Attributes:
        path: the file concerned, or ``None`` for in-memory data.
        tensor: the tensor concerned, or ``None``.
        reason: the message without the file/tensor prefix.
    """

    def __init__(self, reason: str, *, path: str | os.PathLike[str] | None = None,
                 tensor: str | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.tensor = tensor
        self.reason = reason
        where = []
        if self.path is not None:
            where.append(_safe(self.path, 400))
        if tensor is not None:
            where.append(f"tensor {_safe(tensor)!s}")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)

    def __reduce__(self):  # keep keyword-only args picklable (multiprocessing, pytest-xdist)
        return (_rebuild, (type(self), self.reason, self.path, self.tensor))


def _rebuild(cls: type[GGUFError], reason: str, path: str | None, tensor: str | None) -> GGUFError:
    return cls(reason, path=path, tensor=tensor)


class InvalidHeaderError(GGUFError):
    """Not a GGUF file, an unsupported version, a truncated or inconsistent header or metadata."""


class TensorLayoutError(GGUFError):
    """A tensor's data does not fit the file: outside it, misaligned, overlapping, wrong size."""


class UnsupportedTypeError(GGUFError):
    """A ggml type id this library does not know, or an operation the type does not support."""


class ShapeMetadataError(GGUFError):
    """Shape metadata (a >4-D restoration key) is of the wrong type or disagrees with the data."""


class QuantizationError(GGUFError):
    """Input to the quantizer or writer cannot be encoded as asked (bad row length, dtype, ...)."""


class ModelLoadError(GGUFError):
    """A file's tensors do not fit the model: missing or unexpected keys, wrong shapes, buffers
    left on the meta device, or names that no known layout of the model's family explains."""


class UnknownModelError(ModelLoadError):
    """A file whose architecture and tensor names match no model family this library knows."""


class TensorOperationError(TypeError):
    """An operation a quantized :class:`~ggufvideo.GGMLTensor` cannot do (in place writes, raw
    storage access for serializers that expect plain elements, ...).

    A usage error, not a malformed file: a ``TypeError``, outside the :class:`GGUFError` family.
    The message names the operation, the tensor and what to do instead.
    """


class LoraError(GGUFError):
    """A LoRA file that cannot be read or applied: an unknown or malformed key, mismatched
    shapes, a target the model does not have. ``path`` names the LoRA file, ``tensor`` its key."""
