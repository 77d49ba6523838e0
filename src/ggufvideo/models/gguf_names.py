"""llama.cpp's tensor names, from gguf-py's own tables (``gguf.get_tensor_name_map``).

Text-encoder GGUFs are made by llama.cpp's converter, which names tensors by its per-architecture
tables (``token_embd``, ``enc.blk.N.attn_q``, ``blk.N.ffn_gate``...). gguf-py ships the same
tables, keyed by the Hugging Face module names the converter reads. :func:`llama_cpp_rules`
turns them into :class:`~ggufvideo.models.base.Rule` s: a family lists the transformers parameter
templates its model has, and gguf-py says what llama.cpp calls each -- no name is written by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .base import RowOrder, Rule

__all__ = ["llama_cpp_name", "llama_cpp_rules"]

_PROBE = "7"  # a block index to fill templates with (gguf-py's map is built for a block count)


def _arch(arch_name: str):  # type: ignore[no-untyped-def]
    import gguf

    for arch, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch_name:
            return arch
    raise KeyError(f"gguf-py {getattr(gguf, '__version__', '')} has no architecture "
                   f"{arch_name!r}")


def llama_cpp_name(arch_name: str, hf_template: str) -> str | None:
    """llama.cpp's name template for a transformers module template, or ``None`` if unmapped.

    ``llama_cpp_name("t5encoder", "encoder.block.{i}.layer.0.SelfAttention.q")`` is
    ``"enc.blk.{i}.attn_q"``. Templates hold ``{i}`` for the block index.
    """
    import gguf

    name_map = gguf.get_tensor_name_map(_arch(arch_name), int(_PROBE) + 1)
    found = name_map.get_type_and_name(hf_template.replace("{i}", _PROBE))
    if found is None:
        return None
    tensor, _ = found
    return gguf.TENSOR_NAMES[tensor].replace("{bid}", "{i}")


def llama_cpp_rules(arch_name: str, hf_templates: Iterable[str | tuple[str, object]],
                    rows: Mapping[str, RowOrder] | None = None) -> tuple[Rule, ...]:
    """Rules from llama.cpp's names (``arch_name``'s table in gguf-py) to transformers' ones.

    Args:
        arch_name: gguf-py's architecture name (``"t5encoder"``, ``"llama"``).
        hf_templates: transformers module templates
            (``"encoder.block.{i}.layer.0.SelfAttention.q"``), each optionally paired with a
            ``when`` predicate for the rule (two transformers names that llama.cpp stores under
            one name: T5's ``wi`` / ``wi_1``).
        rows: transformers template -> the row order llama.cpp's converter wrote it in
            (:attr:`Rule.rows`; Llama's q/k, permuted for its rotary layout).

    Raises:
        KeyError: gguf-py does not map a template (a family table out of step with gguf-py).
    """
    rules = []
    for item in hf_templates:
        template, when = (item, None) if isinstance(item, str) else item
        gguf_name = llama_cpp_name(arch_name, template)
        if gguf_name is None:
            raise KeyError(f"gguf-py's {arch_name!r} table has no name for {template!r}")
        rules.append(Rule((f"{gguf_name}.*",), (f"{template}.*",), when=when,  # type: ignore[arg-type]
                          rows=(rows or {}).get(template)))
    return tuple(rules)
