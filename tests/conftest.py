from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import oracle as _oracle  # noqa: E402


@pytest.fixture(scope="session")
def oracle() -> _oracle.Oracle:
    """ggml's reference codecs; skips the test when pywhispercpp's libggml-base is absent."""
    lib = _oracle.load()
    if lib is None:
        pytest.skip("ggml oracle (pywhispercpp==1.5.1) not installed")
    return _oracle.Oracle(lib)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
