from __future__ import annotations

import importlib.util
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Triton reads TRITON_INTERPRET once, when it first decorates a kernel; other test modules import
# libraries (diffusers) that import triton at collection time, before test_kernels could set it.
# So it is set here, first, on machines with triton and no CUDA device.
if importlib.util.find_spec("triton") is not None and "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import oracle as _oracle  # noqa: E402

#: In CI (the ``CI`` environment variable set, as CI services do) the references must be there:
#: a test that would skip for want of the ggml oracle or triton fails instead, so a job whose
#: install silently lost them cannot pass with the comparisons quietly skipped.
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
# Skip reasons that mean "a reference is missing" (the oracle fixture, test_writer's needs_ggml,
# test_kernels' needs_triton); "needs CUDA" stays a skip on CPU-only CI.
_MISSING_REFERENCE = re.compile(r"oracle|pywhispercpp|libggml|ggml \(|triton is not installed")


@pytest.fixture(scope="session")
def oracle() -> _oracle.Oracle:
    """ggml's reference codecs; skips the test when pywhispercpp's libggml-base is absent (fails
    it in CI)."""
    lib = _oracle.load()
    if lib is None:
        message = "ggml oracle (pywhispercpp==1.5.1) not installed"
        if IN_CI:
            pytest.fail(f"{message}, and CI requires it")
        pytest.skip(message)
    return _oracle.Oracle(lib)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (IN_CI and report.skipped) or not isinstance(report.longrepr, tuple):
        return
    reason = str(report.longrepr[2])
    if _MISSING_REFERENCE.search(reason):
        report.outcome = "failed"
        report.longrepr = f"CI requires the references, but: {reason}"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- the demo pipeline's parts, shared by the pipeline tests ----------------------------------


@pytest.fixture(scope="module")
def parts():
    """The demo's tiny UMT5 encoder, Wan transformer and Wan VAE (random weights)."""
    pytest.importorskip("diffusers")
    from ggufvideo.demo_generate import build_demo_parts

    return build_demo_parts()


@pytest.fixture(scope="module")
def files(parts, tmp_path_factory):
    """Those parts written as Q8_0 GGUF files (role -> path)."""
    from ggufvideo.demo_generate import write_demo_files

    return write_demo_files(str(tmp_path_factory.mktemp("parts")), parts)
