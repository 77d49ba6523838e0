"""Quick fuzz pass: mutated files either load or raise a GGUFError naming the file.

The long run (>= 100k cases) is ``python benchmarks/fuzz/fuzz_gguf.py --cases 100000``.
"""

from __future__ import annotations

import numpy as np
import pytest
from fuzzing import HUGE, check, mutate, seeds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SEEDS = seeds()
IDS = [s.name for s in SEEDS]


@pytest.mark.parametrize("seed", SEEDS, ids=IDS)
def test_valid_seed_loads(tmp_path, seed):
    p = tmp_path / "seed.gguf"
    p.write_bytes(seed.data)
    assert check(p) == "ok"


@pytest.mark.parametrize("seed", SEEDS, ids=IDS)
def test_truncation_at_every_structural_boundary(tmp_path, seed):
    p = tmp_path / "cut.gguf"
    for cut in sorted(set(seed.marks.boundaries)):
        for delta in (-1, 0, 1):
            p.write_bytes(seed.data[:max(0, cut + delta)])
            check(p)


@pytest.mark.parametrize("seed", SEEDS[::4] + SEEDS[-2:], ids=IDS[::4] + IDS[-2:])
def test_huge_values_in_every_numeric_header_field(tmp_path, seed):
    p = tmp_path / "huge.gguf"
    for pos, width, _what in seed.marks.fields:
        for v in HUGE:
            data = bytearray(seed.data)
            data[pos:pos + width] = (v & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
            p.write_bytes(bytes(data))
            check(p)


@pytest.mark.parametrize("n_dims", [0, 5, 64])
def test_n_dims_of_0_5_and_64(tmp_path, n_dims):
    p = tmp_path / "nd.gguf"
    for seed in SEEDS:
        for pos, width, what in seed.marks.fields:
            if what == "n_dims":
                data = bytearray(seed.data)
                data[pos:pos + width] = n_dims.to_bytes(width, "little")
                p.write_bytes(bytes(data))
                check(p)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, len(SEEDS) - 1), rng_seed=st.integers(0, 2**63 - 1))
def test_random_mutations_never_escape_the_error_hierarchy(tmp_path, which, rng_seed):
    data, _desc = mutate(SEEDS[which], np.random.default_rng(rng_seed))
    p = tmp_path / "m.gguf"
    p.write_bytes(data)
    check(p)
