"""Spec of the quant-type registry: declared layouts and type-name normalisation."""

from __future__ import annotations

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ggufvideo.errors import GGUFError, QuantizationError, UnsupportedTypeError
from ggufvideo.quants import get_quant_type, registered_types, to_qtype


@pytest.mark.parametrize("qtype", list(registered_types()), ids=lambda q: q.name)
def test_layout_sizes_match_gguf_quant_sizes(qtype: GGMLQuantizationType) -> None:
    qt = registered_types()[qtype]
    assert (qt.block_size, qt.type_size()) == GGML_QUANT_SIZES[qtype]
    assert qt.layout.type_size == sum(f.nbytes for f in qt.layout.fields)


def test_every_type_of_the_reference_table_is_registered() -> None:
    wanted = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
              "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
    assert [n for n in wanted if GGMLQuantizationType[n] not in registered_types()] == []


@pytest.mark.parametrize("given", ["Q4_K", "q4_k", " Q4_K ", int(GGMLQuantizationType.Q4_K),
                                   GGMLQuantizationType.Q4_K])
def test_to_qtype_accepts_names_ids_and_enums(given: object) -> None:
    assert to_qtype(given) is GGMLQuantizationType.Q4_K


@pytest.mark.parametrize("given", ["Q4_Z", "", "float32", 9999, -1])
def test_to_qtype_rejects_unknown_types_with_unsupported_type_error(given: object) -> None:
    with pytest.raises(UnsupportedTypeError) as err:
        to_qtype(given)
    assert isinstance(err.value, GGUFError) and isinstance(err.value, ValueError)
    assert repr(given) in str(err.value) or str(given) in str(err.value)


def test_to_qtype_rejects_non_type_values_with_type_error() -> None:
    with pytest.raises(TypeError):
        to_qtype(4.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        to_qtype(True)  # type: ignore[arg-type]


def test_get_quant_type_names_the_unsupported_type() -> None:
    missing = [q for q in GGMLQuantizationType if q not in registered_types()]
    if not missing:
        pytest.skip("every ggml type is registered")
    with pytest.raises(UnsupportedTypeError, match=missing[0].name):
        get_quant_type(missing[0])


def test_row_elements_rejects_a_partial_block() -> None:
    qt = get_quant_type("Q4_K")
    assert qt.row_elements(3 * 144) == 3 * 256
    with pytest.raises(QuantizationError, match="144-byte"):
        qt.row_elements(145)
    with pytest.raises(QuantizationError, match="block size 256"):
        qt.row_bytes(255)
