"""The public API is coherent: what exported functions return or raise is exported too."""

from __future__ import annotations

import ggufvideo


def test_returned_and_raised_types_are_exported():
    for name in ("WriteSummary", "TensorDecision", "ValidationReport", "IncompatibleKeys",
                 "ImatrixError", "GGUFError", "ModelLoadError", "UnknownModelError",
                 "inspect_file", "validate_file", "resolve_dtype"):
        assert name in ggufvideo.__all__ and hasattr(ggufvideo, name), name
    for name in ggufvideo.__all__:
        assert hasattr(ggufvideo, name), name


def test_summaries_of_exported_functions_are_the_exported_classes(tmp_path):
    import torch

    path = tmp_path / "m.gguf"
    summary = ggufvideo.save_state_dict({"w": torch.zeros(32, 32)}, path, qtype="Q8_0")
    assert isinstance(summary, ggufvideo.WriteSummary)
    assert all(isinstance(d, ggufvideo.TensorDecision) for d in summary.decisions.values())
    assert isinstance(ggufvideo.validate_file(path), ggufvideo.ValidationReport)
