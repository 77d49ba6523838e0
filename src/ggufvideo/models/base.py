"""What a model family is: its layouts (tensor naming schemes), how it is detected, its config.

A family is *data*: a :class:`Family` names the ``general.architecture`` values real files carry,
the keys that identify each of its layouts, one table of :class:`Rule` s per non-canonical layout,
and a function that reads the model's config off the tensors' shapes. Every layout is mapped to and
from one canonical layout, diffusers' names (``"diffusers"``); mapping between two other layouts
goes through it.

A rule pairs key templates of a layout (``"blocks.{i}.self_attn.q.*"``) with the diffusers ones
(``"blocks.{i}.attn1.to_q.*"``): ``{name}`` matches a decimal index, a trailing ``*`` the rest of
the key. One side may hold several templates: the tensors of that side are the row blocks (dim 0)
of the other side's single tensor -- a fused QKV projection and its three parts. Rules work in both
directions, so one table serves reading and writing.

The conversion is generic over what it moves (:class:`ValueOps`): tensors when loading, shapes when
inferring a config, lazy source tensors when converting a file. For quantized tensors a row split
or concatenation moves raw ggml blocks (each row is whole blocks), so it is exact and never decodes.
A rule may also reorder rows (:attr:`Rule.rows`: llama.cpp's per-head q/k row order for its rotary
layout); the order can depend on the file's metadata (head counts), passed as ``context``. For
quantized tensors that too is a gather of whole rows of blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from ..errors import ModelLoadError, _safe

__all__ = [
    "CANONICAL",
    "Rule",
    "RowOrder",
    "Family",
    "Shapes",
    "ValueOps",
    "ShapeOps",
    "convert_layout",
    "inverse_permutation",
    "rename",
]

#: The layout every family maps to and from: diffusers' parameter names.
CANONICAL = "diffusers"

V = TypeVar("V")

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Template:
    """A key pattern: literal text, ``{name}`` indices, and an optional trailing ``*`` (the
    rest)."""

    __slots__ = ("text", "names", "regex", "literal_prefix")

    def __init__(self, text: str) -> None:
        self.text = text
        body, star = (text[:-1], True) if text.endswith("*") else (text, False)
        parts, names, pos = [], [], 0
        for m in _PLACEHOLDER.finditer(body):
            parts.append(re.escape(body[pos:m.start()]))
            parts.append(rf"(?P<{m.group(1)}>\d+)")
            names.append(m.group(1))
            pos = m.end()
        parts.append(re.escape(body[pos:]))
        if star:
            parts.append(r"(?P<_rest>.+)")
            names.append("_rest")
        self.names = tuple(names)
        self.regex = re.compile("".join(parts) + r"\Z")
        first = _PLACEHOLDER.search(body)
        self.literal_prefix = body[:first.start()] if first else body

    def match(self, key: str) -> dict[str, str] | None:
        if not key.startswith(self.literal_prefix):
            return None
        m = self.regex.match(key)
        return m.groupdict() if m else None

    def fill(self, captures: Mapping[str, str]) -> str:
        out = _PLACEHOLDER.sub(lambda m: captures[m.group(1)], self.text)
        return out[:-1] + captures["_rest"] if out.endswith("*") else out


#: A rule's row order: (rows of the other layout's tensor, the conversion's context -- the file's
#: metadata) -> ``p`` such that diffusers' tensor is ``other[p]`` (rows of dim 0).
RowOrder = Callable[[int, Mapping[str, Any]], Sequence[int]]

#: ``sizes`` of a split: proportions of the rows, or a function of (total rows, captures, rows of
#: any source key by name -- ``None`` when absent) giving the row counts.
SplitSizes = tuple[int, ...] | Callable[[int, Mapping[str, str], Callable[[str], int | None]],
                                         Sequence[int]]


@dataclass(frozen=True)
class Rule:
    """How one (group of) tensor(s) of a layout corresponds to diffusers' tensor(s).

    Attributes:
        other: templates in the non-canonical layout.
        diffusers: templates in diffusers' layout. At most one side has several templates: those
            tensors are consecutive row blocks of the other side's single tensor.
        sizes: how the single tensor splits into the parts (``None``: equal parts).
        swap_halves: the two row halves are in the opposite order on the other side (shift/scale
            vs scale/shift modulation, gate/value of a gated FFN). Applied to the fused tensor.
        when: only applies when converting *from* the other layout and this returns true for
            (captures, the source keys) -- e.g. "the last block", told by a tensor it lacks.
        rows: the rows of dim 0 are in another order on the other side: a :data:`RowOrder`
            giving ``p`` with ``diffusers = other[p]`` (the inverse permutation is applied the
            other way). Applied to the other side's (fused) tensor, before ``swap_halves`` when
            converting to diffusers' layout. Evaluated only when values are moved (not for
            shapes), so describing a file needs no context. It raises :class:`ModelLoadError`
            when the context lacks what it needs (a head count).
    """

    other: tuple[str, ...]
    diffusers: tuple[str, ...]
    sizes: SplitSizes | None = None
    swap_halves: bool = False
    when: Callable[[Mapping[str, str], Mapping[str, Any]], bool] | None = None
    rows: RowOrder | None = None
    _compiled: dict[str, tuple[_Template, ...]] = field(default_factory=dict, compare=False,
                                                        repr=False)

    def __post_init__(self) -> None:
        if len(self.other) > 1 and len(self.diffusers) > 1:
            raise ValueError(f"rule {self.other} <-> {self.diffusers}: only one side may split")
        self._compiled["other"] = tuple(_Template(t) for t in self.other)
        self._compiled[CANONICAL] = tuple(_Template(t) for t in self.diffusers)
        names = [set(t.names) for t in (*self._compiled["other"], *self._compiled[CANONICAL])]
        if any(n != names[0] for n in names):
            raise ValueError(f"rule {self.other} <-> {self.diffusers}: placeholders differ")

    def side(self, canonical: bool) -> tuple[_Template, ...]:
        return self._compiled[CANONICAL if canonical else "other"]


def rename(other: str, diffusers: str) -> Rule:
    """A one-to-one rule (the common case), e.g. ``rename("head.head.*", "proj_out.*")``."""
    return Rule((other,), (diffusers,))


class ValueOps(Protocol[V]):
    """Row operations on whatever a conversion moves (tensors, shapes, lazy sources)."""

    def rows(self, v: V) -> int: ...
    def split(self, v: V, sizes: Sequence[int]) -> list[V]: ...
    def cat(self, vs: Sequence[V]) -> V: ...
    def swap_halves(self, v: V) -> V: ...
    def permute_rows(self, v: V, order: Callable[[], Sequence[int]]) -> V:
        """``v``'s rows of dim 0 reordered: row ``i`` of the result is row ``order()[i]``.

        ``order`` is called only by values that need it (shapes do not change)."""
        ...


def inverse_permutation(order: Sequence[int]) -> list[int]:
    """``q`` with ``q[order[i]] == i`` (an error unless ``order`` is a permutation)."""
    inv = [-1] * len(order)
    for i, j in enumerate(order):
        if not 0 <= j < len(order) or inv[j] != -1:
            raise ValueError(f"row order is not a permutation of {len(order)} rows")
        inv[j] = i
    return inv


class ShapeOps:
    """:class:`ValueOps` over shapes (tuples): what a conversion does to shapes."""

    def rows(self, v: tuple[int, ...]) -> int:
        return v[0]

    def split(self, v: tuple[int, ...], sizes: Sequence[int]) -> list[tuple[int, ...]]:
        return [(s, *v[1:]) for s in sizes]

    def cat(self, vs: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        return (sum(v[0] for v in vs), *vs[0][1:])

    def swap_halves(self, v: tuple[int, ...]) -> tuple[int, ...]:
        return v

    def permute_rows(self, v: tuple[int, ...], order: Callable[[], Sequence[int]]
                     ) -> tuple[int, ...]:
        return v


def _row_order(rule: Rule, n: int, context: Mapping[str, Any], inverse: bool, what: str
               ) -> Callable[[], Sequence[int]]:
    def order() -> Sequence[int]:
        assert rule.rows is not None
        p = [int(i) for i in rule.rows(n, context)]
        if len(p) != n:
            raise ModelLoadError(f"row order of {len(p)} rows for a tensor of {n} rows",
                                 tensor=what)
        try:
            return inverse_permutation(p) if inverse else p
        except ValueError as exc:
            raise ModelLoadError(str(exc), tensor=what) from None
    return order


def _split_sizes(rule: Rule, total: int, captures: Mapping[str, str], parts: int,
                 rows_of: Callable[[str], int | None], what: str) -> list[int]:
    if callable(rule.sizes):
        sizes = [int(s) for s in rule.sizes(total, captures, rows_of)]
    else:
        props = rule.sizes or (1,) * parts
        unit, rem = divmod(total, sum(props))
        if rem:
            raise ModelLoadError(f"{total} rows do not split into parts of proportions "
                                 f"{list(props)}", tensor=what)
        sizes = [p * unit for p in props]
    if len(sizes) != parts or sum(sizes) != total or min(sizes) < 0:
        raise ModelLoadError(f"cannot split {total} rows into {parts} parts {sizes}", tensor=what)
    return sizes


def convert_layout(values: Mapping[str, V], rules: Iterable[Rule], *, to_canonical: bool,
                   ops: ValueOps[V], context: Mapping[str, Any] | None = None
                   ) -> tuple[dict[str, V], list[str]]:
    """Rename (and split/fuse) ``values`` between a layout and diffusers'.

    ``to_canonical``: from the rules' other layout to diffusers' (else the reverse). The first rule
    whose source-side template matches a key wins; keys no rule matches pass through unchanged
    (names both layouts share). Returns the converted mapping (source order) and the keys that
    a rule matched but could not convert because a part of their group is missing. ``context``
    (the file's metadata) is what rules' row orders read (:attr:`Rule.rows`).
    """
    rules = list(rules)
    ctx: Mapping[str, Any] = context if context is not None else {}
    out: dict[str, V] = {}
    consumed: set[str] = set()
    incomplete: list[str] = []

    def rows_of(k: str) -> int | None:
        return ops.rows(values[k]) if k in values else None

    for key in values:
        if key in consumed:
            continue
        for rule in rules:
            src_side, dst_side = rule.side(not to_canonical), rule.side(to_canonical)
            captures = None
            for tpl in src_side:
                captures = tpl.match(key)
                if captures is not None:
                    break
            if captures is None:
                continue
            if to_canonical and rule.when is not None and not rule.when(captures, values):
                continue
            group = [t.fill(captures) for t in src_side]
            if any(k not in values or k in consumed for k in group):
                incomplete.append(key)
                out[key] = values[key]
                consumed.add(key)
                break
            v = values[group[0]] if len(group) == 1 else ops.cat([values[k] for k in group])
            if rule.rows is not None and to_canonical:
                v = ops.permute_rows(v, _row_order(rule, ops.rows(v), ctx, False, key))
            if rule.swap_halves:
                v = ops.swap_halves(v)
            if rule.rows is not None and not to_canonical:
                v = ops.permute_rows(v, _row_order(rule, ops.rows(v), ctx, True, key))
            targets = [t.fill(captures) for t in dst_side]
            if len(targets) == 1:
                parts = [v]
            else:
                sizes = _split_sizes(rule, ops.rows(v), captures, len(targets), rows_of, key)
                parts = ops.split(v, sizes)
            out.update(zip(targets, parts))
            consumed.update(group)
            break
        else:
            out[key] = values[key]
            consumed.add(key)
    return out, incomplete


class Shapes(Mapping[str, tuple[int, ...]]):
    """Tensor shapes by (diffusers) name, for config inference, with errors that name the tensor.

    ``source`` names the file in messages.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], source: str | None = None) -> None:
        self._shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self.source = source

    def __getitem__(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def require(self, key: str, why: str, ndim: int | None = None) -> tuple[int, ...]:
        """The shape of ``key``; a :class:`ModelLoadError` naming it and ``why`` when absent."""
        shape = self._shapes.get(key)
        if shape is None:
            raise ModelLoadError(f"cannot infer {why}: the file has no tensor {_safe(key)!r}",
                                 path=self.source)
        if ndim is not None and len(shape) != ndim:
            raise ModelLoadError(f"cannot infer {why}: expected a {ndim}-D tensor, found shape "
                                 f"{list(shape)}", path=self.source, tensor=key)
        return shape

    def indices(self, template: str) -> list[int]:
        """Sorted distinct values of ``{i}`` over keys matching ``template``
        (``"blocks.{i}.*"``)."""
        tpl = _Template(template)
        found = set()
        for k in self._shapes:
            m = tpl.match(k)
            if m is not None:
                found.add(int(next(v for n, v in m.items() if n != "_rest")))
        return sorted(found)

    def count(self, template: str) -> int:
        """How many consecutive indices ``0..n-1`` the template has (an error if there are gaps)."""
        idx = self.indices(template)
        if idx != list(range(len(idx))):
            missing = sorted(set(range(max(idx) + 1)) - set(idx)) if idx else []
            raise ModelLoadError(f"tensors {template!r} have gaps: indices {missing} are missing",
                                 path=self.source)
        return len(idx)

    def has(self, key: str) -> bool:
        return key in self._shapes

    def any(self, template: str) -> bool:
        tpl = _Template(template)
        return any(tpl.match(k) is not None for k in self._shapes)


@dataclass(frozen=True)
class Family(Generic[V]):
    """One model family (e.g. the Wan transformers): detection, layouts, config, class.

    Attributes:
        name: short id (``"wan"``, ``"wan-vae"``).
        title: human name.
        kind: ``"transformer"``, ``"vae"`` or ``"text-encoder"``.
        architectures: ``general.architecture`` values files of this family carry.
        signatures: layout name -> alternatives, each a tuple of keys that must all be present for
            a file to be in that layout (checked after prefix stripping; a diffusers layout entry is
            required).
        rules: layout name -> its rules to and from diffusers' layout.
        infer_config: diffusers-named :class:`Shapes` -> the diffusers config (constructor kwargs).
        class_name: config -> the diffusers class name to build (``"WanTransformer3DModel"``).
        variant: (config, shapes) -> a human variant name (``"T2V 14B"``).
        original_prefix: prefix the original layout's published files put before every key
            (``"model.diffusion_model."`` for files made for ComfyUI), written with ``--layout
            original``; ``""`` for none.
        library: the library whose class :attr:`class_name` names: ``"diffusers"`` or
            ``"transformers"`` (text encoders; their canonical layout, still called
            ``"diffusers"``, holds transformers' parameter names).
        metadata_config: GGUF metadata key (after ``"<general.architecture>."``) -> config key,
            for settings no shape tells (``"attention.layer_norm_epsilon"``); the file's values
            win over the inferred ones.
        unused: templates of tensors files of this family may carry that the built model does not
            use (a text-encoder file's decoder); :func:`ggufvideo.from_gguf` leaves them out.
        layout_metadata: layout -> (config -> metadata) a file in that layout carries for
            other readers (llama.cpp's hyperparameter keys); written by ``convert --layout``.
        unsupported: variants of the family that carry modules this library does not build:
            marker template (any layout) -> the variant's name. A file holding one is refused by
            that name rather than built as the plain model and failing on its extra keys.
        release_layout: for a family whose releases changed their names (one layout per
            release: ``original-0.9.0``, ``original-2.2``...), the layout of the release a model
            with this config belongs to; ``"original"`` means that one (``convert --layout
            original``). ``None``: ``"original"`` is a single layout.
    """

    name: str
    title: str
    kind: str
    architectures: tuple[str, ...]
    signatures: Mapping[str, tuple[tuple[str, ...], ...]]
    rules: Mapping[str, tuple[Rule, ...]]
    infer_config: Callable[[Shapes], dict[str, Any]]
    class_name: Callable[[Mapping[str, Any]], str]
    variant: Callable[[Mapping[str, Any], Shapes], str]
    original_prefix: str = ""
    library: str = "diffusers"
    metadata_config: Mapping[str, str] = field(default_factory=dict)
    unused: tuple[str, ...] = ()
    unsupported: Mapping[str, str] = field(default_factory=dict)
    layout_metadata: Mapping[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = field(
        default_factory=dict)
    release_layout: Callable[[Mapping[str, Any]], str] | None = None

    def resolve_layout(self, layout: str, config: Mapping[str, Any]) -> str:
        """``layout`` as asked by a user: ``"original"`` becomes the release layout of a model
        with ``config`` where the family has several; any other name is returned as is."""
        if layout == "original" and self.release_layout is not None:
            return self.release_layout(config)
        return layout

    @property
    def layouts(self) -> tuple[str, ...]:
        """Layout names, diffusers' first."""
        return (CANONICAL, *(k for k in self.rules if k != CANONICAL))

    def is_unused(self, key: str) -> bool:
        """Whether ``key`` (in any layout) is a tensor the built model does not use."""
        return any(_Template(t).match(key) is not None for t in self.unused)

    def unsupported_variant(self, keys: Iterable[str]) -> tuple[str, str] | None:
        """(variant name, the key that shows it) when ``keys`` hold a marker of
        :attr:`unsupported`, else ``None``."""
        templates = [(_Template(t), name) for t, name in self.unsupported.items()]
        for key in keys:
            for template, name in templates:
                if template.match(key) is not None:
                    return name, key
        return None

    def layout_of(self, keys: Mapping[str, Any] | set[str]) -> str | None:
        """The layout whose signature ``keys`` satisfy, or ``None``."""
        for layout, alternatives in self.signatures.items():
            if any(all(k in keys for k in alt) for alt in alternatives):
                return layout
        return None

    def convert(self, values: Mapping[str, V], src: str, dst: str, ops: ValueOps[V],
                context: Mapping[str, Any] | None = None) -> dict[str, V]:
        """``values`` named in layout ``src`` renamed (split, fused, reordered) into layout ``dst``.

        ``context``: the file's metadata (GGUF key -> value), which rules' row orders read
        (:attr:`Rule.rows`: llama.cpp's q/k order needs the head counts); ``None``: empty.

        Raises:
            ModelLoadError: an unknown layout, a tensor group one layout fuses whose parts are
                not all present, or a row order the context cannot give (named).
        """
        for layout in (src, dst):
            if layout not in self.layouts:
                raise ModelLoadError(f"{self.title} has no layout {layout!r} (known: "
                                     f"{', '.join(self.layouts)})")
        if src == dst:
            return dict(values)
        out: Mapping[str, V] = values
        if src != CANONICAL:
            out, bad = convert_layout(out, self.rules[src], to_canonical=True, ops=ops,
                                      context=context)
            _check_complete(bad, self, src)
        if dst != CANONICAL:
            out, bad = convert_layout(out, self.rules[dst], to_canonical=False, ops=ops,
                                      context=context)
            _check_complete(bad, self, CANONICAL)
        return dict(out)


def _check_complete(incomplete: list[str], family: Family[Any], layout: str) -> None:
    if incomplete:
        shown = ", ".join(_safe(k) for k in incomplete[:5])
        raise ModelLoadError(f"{family.title}, {layout} layout: tensor(s) {shown} belong to a "
                             "group that the other layout stores as one tensor, but the group's "
                             "other parts are missing")
