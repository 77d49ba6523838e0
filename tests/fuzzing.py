"""A mutation fuzzer for the GGUF parser and loader.

Seeds are valid files of every registered type with metadata of every kind (scalars, strings, string
and numeric arrays, nested mixed arrays, shape-restoration keys, an explicit alignment). Mutations
are the catalogue of the hardening issue: bit flips, byte insertions and deletions, truncation at
structural boundaries, huge counts/lengths/dims/offsets, n_dims of 0/5/64, mixed and nested metadata
arrays, overlapping and out-of-file tensors, bad alignment values.

The contract (:func:`check`): opening, decoding every metadata value, ``load_state_dict`` eager and
lazy (with every lazy tensor decoded), ``inspect`` and ``validate`` either succeed or raise a
``GGUFError`` whose message names the file — no other exception type, no crash, bounded time.

Used by ``tests/test_fuzz_parser.py`` (a quick pass in CI) and ``benchmarks/fuzz/fuzz_gguf.py``
(the long run).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf_bytes import GGUFBuilder, Marks
from strategies import finite_blocks

import ggufvideo
from ggufvideo import GGMLTensor, GGUFError, GGUFFile, load_state_dict
from ggufvideo.inspection import format_inspection, inspect_file, validate_file
from ggufvideo.quants import registered_types

HUGE = [2**64 - 1, 2**63, 2**63 - 1, 2**62, 2**32 - 1, 2**31, 2**16, 0, 1]


@dataclass
class Seed:
    name: str
    data: bytes
    marks: Marks


def _seed(name: str, b: GGUFBuilder) -> Seed:
    m = Marks()
    return Seed(name, b.build(m), m)


def seeds() -> list[Seed]:
    """Valid files: one per registered type, plus metadata-heavy and >4-D ones."""
    out = []
    for i, (qtype, qt) in enumerate(registered_types().items()):
        b = GGUFBuilder()
        b.add("general.architecture", V.STRING, "wan")
        b.add("general.alignment", V.UINT32, 32)
        b.add("n", V.UINT64, 7).add("f", V.FLOAT32, 0.5).add("flag", V.BOOL, True)
        b.add("toks", V.ARRAY, ["a", "bc", "déf"], V.STRING)
        b.add("nums", V.ARRAY, [1, -2, 3], V.INT32)
        b.add("mixed", V.ARRAY, [(V.UINT8, [1, 2]), (V.STRING, ["x"]), (V.FLOAT64, [1.5])], V.ARRAY)
        n_blocks = 2
        if qt.torch_dtype is None:
            raw = finite_blocks(qtype, n_blocks, seed=i).tobytes()
            shape: tuple[int, ...] = (n_blocks, qt.block_size)
        else:
            shape = (2, 8)
            raw = np.random.default_rng(i).integers(0, 256, 16 * qt.type_size(), dtype=np.uint8)
            if qt.torch_dtype.is_floating_point:  # finite values only
                raw = np.zeros_like(raw)
            raw = raw.tobytes()
        b.tensor("blk.0.weight", qtype, shape, raw)
        b.tensor("blk.0.bias", T.F32, (4,), np.arange(4, dtype=np.float32).tobytes())
        out.append(_seed(qtype.name, b))
    # >4-D tensors by all three conventions.
    x = np.arange(2 * 16 * 1 * 2 * 2, dtype=np.float32)
    b = GGUFBuilder().tensor("patch.native", T.F32, (2, 16, 1, 2, 2), x.tobytes())
    b.add("comfy.gguf.orig_shape.patch.comfy", V.ARRAY, [2, 16, 1, 2, 2], V.INT32)
    b.tensor("patch.comfy", T.F32, (1, 128), x.tobytes())
    b.add("patch.flat.raw_shape", V.ARRAY, [2, 16, 1, 2, 2], V.UINT64)
    b.tensor("patch.flat", T.F32, (128,), x.tobytes())
    out.append(_seed("five_d", b))
    # A vocabulary-like file: long string array, no tensors.
    b = GGUFBuilder().add("tokenizer.ggml.tokens", V.ARRAY, [f"t{i}" for i in range(300)], V.STRING)
    out.append(_seed("vocab", b))
    return out


def _put(data: bytearray, pos: int, width: int, value: int) -> None:
    value &= (1 << (8 * width)) - 1
    data[pos:pos + width] = value.to_bytes(width, "little")


def mutate(seed: Seed, rng: np.random.Generator) -> tuple[bytes, str]:
    """One to three random mutations of ``seed``; returns the bytes and a description."""
    data = bytearray(seed.data)
    done = []
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.choice(["flip", "insert", "delete", "truncate", "huge", "ndims", "offset",
                           "type_tag", "splice", "zero"])
        n = len(data)
        if n == 0:
            break
        if kind == "flip":
            for _ in range(int(rng.integers(1, 9))):
                p = int(rng.integers(0, n))
                data[p] ^= 1 << int(rng.integers(0, 8))
        elif kind == "insert":
            p = int(rng.integers(0, n + 1))
            data[p:p] = rng.integers(0, 256, int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
        elif kind == "delete":
            p = int(rng.integers(0, n))
            del data[p:p + int(rng.integers(1, 17))]
        elif kind == "truncate":
            cut = int(rng.choice(seed.marks.boundaries)) + int(rng.integers(-3, 4))
            del data[max(0, cut):]
        elif kind == "huge" and seed.marks.fields:
            pos, width, what = seed.marks.fields[int(rng.integers(0, len(seed.marks.fields)))]
            choices = HUGE + [n, n + 1, n - 1, int(rng.integers(0, 2**31))]
            if pos + width <= len(data):
                _put(data, pos, width, int(rng.choice(choices)))
            kind = f"huge:{what}"
        elif kind == "ndims":
            cands = [f for f in seed.marks.fields if f[2] == "n_dims"]
            if cands:
                pos, width, _ = cands[int(rng.integers(0, len(cands)))]
                if pos + width <= len(data):
                    _put(data, pos, width, int(rng.choice([0, 5, 64, 4, 2**31])))
        elif kind == "offset":
            cands = [f for f in seed.marks.fields if f[2] == "tensor_offset"]
            if cands:
                pos, width, _ = cands[int(rng.integers(0, len(cands)))]
                if pos + width <= len(data):
                    old = int.from_bytes(data[pos:pos + width], "little")
                    _put(data, pos, width, int(rng.choice([0, 32, old + 1, old + 16, old - 32,
                                                           n, 2**63, old + 2**40])))
        elif kind == "type_tag":
            cands = [f for f in seed.marks.fields if f[2] in ("value_type", "item_type", "tensor_type")]
            if cands:
                pos, width, _ = cands[int(rng.integers(0, len(cands)))]
                if pos + width <= len(data):
                    _put(data, pos, width, int(rng.choice([9, 8, 12, 13, 0, 40, 41, 2**32 - 1,
                                                           int(rng.integers(0, 64))])))
        elif kind == "splice":
            a, b = sorted(int(v) for v in rng.integers(0, n, 2))
            dst = int(rng.integers(0, n))
            data[dst:dst + (b - a)] = data[a:b]
        elif kind == "zero":
            p = int(rng.integers(0, n))
            data[p:p + int(rng.integers(1, 33))] = bytes(min(32, n - p))
        done.append(str(kind))
    return bytes(data), "+".join(done)


def _inspect_and_validate(path: Path) -> None:
    """The CLI's inspect and validate code paths (validate reports problems, never raises)."""
    info = inspect_file(path)
    format_inspection(info)
    json.dumps(info)
    report = validate_file(path)
    assert isinstance(report.ok, bool)


def check(path: Path, *, time_limit: float = 10.0) -> str:
    """Apply every entry point to ``path``; return ``"ok"`` or the GGUFError subclass name.

    Raises AssertionError when the contract is broken (another exception type, a message not naming
    the file, or too slow).
    """
    t0 = time.perf_counter()
    outcome = "ok"
    try:
        try:
            with GGUFFile(path) as f:
                for key in f.fields:
                    f.metadata[key]
            for lazy in (False, True):
                sd = load_state_dict(path, lazy=lazy)
                for t in sd.values():
                    if isinstance(t, GGMLTensor):
                        t.dequantize()
            _inspect_and_validate(path)
        except GGUFError as e:
            assert str(path) in str(e), f"error does not name the file: {e}"
            outcome = type(e).__name__
    except AssertionError:
        raise
    except BaseException as e:  # noqa: BLE001 - the point is to catch everything else
        if isinstance(e, KeyboardInterrupt):
            raise
        raise AssertionError(f"{type(e).__name__} escaped on {path}: {e!r}") from e
    elapsed = time.perf_counter() - t0
    assert elapsed < time_limit, f"{path} took {elapsed:.1f}s"
    return outcome


def header_fields(data: bytes) -> tuple[int, int, int]:
    """(version, n_tensors, n_kv) of a GGUF header (for reports)."""
    return struct.unpack_from("<IQQ", data, 4) if len(data) >= 24 else (0, 0, 0)


__all__ = ["Seed", "seeds", "mutate", "check", "ggufvideo"]
