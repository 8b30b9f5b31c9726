"""A key-map table that runs both ways: source names <-> jft variable paths.

One :class:`Table` per architecture and source layout lists :class:`Rule` s: a
source module name (``encoder.layer.{i}.attention.self.query``), the jft module
path (``backbone/encoder/layer_{i}/attention/query``) and a :class:`Kind` saying
how each of the module's tensors maps (``weight`` -> ``kernel``, transposed).
:meth:`Table.forward` (import) and :meth:`Table.inverse` (export) read the same
rules, so the two directions cannot drift.

Placeholders: ``{i}`` matches a number; ``{i+1}`` (or ``{i-1}``) in one template
is that number shifted, so ``stages.{s}`` <-> ``layer{s+1}`` holds both ways.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jft.weights.keymaps._common import conv_kernel

Array = np.ndarray
Context = Mapping[str, Any]


def _same(x: Array, ctx: Context) -> Array:
    del ctx
    return x


def _transpose(x: Array, ctx: Context) -> Array:
    del ctx
    return x.T


def _to_conv(x: Array, ctx: Context) -> Array:
    del ctx
    return conv_kernel(x)  # OIHW -> HWIO


def _from_conv(x: Array, ctx: Context) -> Array:
    del ctx
    return np.transpose(x, (3, 2, 0, 1))  # HWIO -> OIHW


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One tensor of a module: ``src`` leaf name <-> ``collection/dst`` jft leaf.

    ``to_jft`` and ``to_src`` are inverse layout changes (given a context such as
    the number of channels). ``alias`` leaves are accepted on import only (old
    names); ``counter`` leaves (``num_batches_tracked``) are dropped on import and
    written as an int64 zero on export, so a PyTorch module loads the file strictly.
    """

    src: str
    dst: str
    collection: str = "params"
    to_jft: Callable[[Array, Context], Array] = _same
    to_src: Callable[[Array, Context], Array] = _same
    alias: bool = False
    counter: bool = False


Kind = tuple[Leaf, ...]

LINEAR: Kind = (
    Leaf("weight", "kernel", to_jft=_transpose, to_src=_transpose),
    Leaf("bias", "bias"),
)
LINEAR_NO_BIAS: Kind = LINEAR[:1]
NORM: Kind = (
    Leaf("weight", "scale"),
    Leaf("bias", "bias"),
    Leaf("gamma", "scale", alias=True),  # TF-converted checkpoints
    Leaf("beta", "bias", alias=True),
)
EMBED: Kind = (Leaf("weight", "embedding"),)
CONV: Kind = (Leaf("weight", "kernel", to_jft=_to_conv, to_src=_from_conv), Leaf("bias", "bias"))
CONV_NO_BIAS: Kind = CONV[:1]
BATCH_NORM: Kind = (
    Leaf("weight", "scale"),
    Leaf("bias", "bias"),
    Leaf("running_mean", "mean", "batch_stats"),
    Leaf("running_var", "var", "batch_stats"),
    Leaf("num_batches_tracked", "", counter=True),
)
TENSOR: Kind = (Leaf("", ""),)  # the module name is the tensor's name (``cls_token``)
KERAS_DENSE: Kind = (Leaf("kernel", "kernel"), Leaf("bias", "bias"))  # Keras layout = Flax's


@dataclasses.dataclass(frozen=True)
class Rule:
    """A source module <-> a jft module (or several: a fused tensor split in equal parts).

    ``top``: the source name sits outside the layout's prefix (``classifier`` of
    ``BertForSequenceClassification`` next to ``bert.*``). ``alias``: import only.
    """

    src: str
    dst: str | tuple[str, ...]
    kind: Kind
    top: bool = False
    alias: bool = False


_PLACEHOLDER = re.compile(r"\{(\w+)([+-]\d+)?\}")


@functools.cache
def _template(template: str) -> tuple[re.Pattern[str], list[tuple[str, int]]]:
    """A template -> (its regex, [(variable, offset)] in order)."""
    parts, variables, pos = [], [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        parts.append(r"(\d+)")
        variables.append((m[1], int(m[2] or 0)))
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts)), variables


def _match(template: str, name: str) -> dict[str, int] | None:
    pattern, variables = _template(template)
    m = pattern.fullmatch(name)
    if m is None:
        return None
    values: dict[str, int] = {}
    for (var, offset), text in zip(variables, m.groups(), strict=True):
        value = int(text) - offset
        if values.setdefault(var, value) != value or value < 0:
            return None
    return values


def _fill(template: str, values: Mapping[str, int]) -> str:
    return _PLACEHOLDER.sub(lambda m: str(values[m[1]] + int(m[2] or 0)), template)


def _join(*parts: str, sep: str) -> str:
    return sep.join(p for p in parts if p)


@dataclasses.dataclass(frozen=True)
class Table:
    """The rules of one source layout, with its name separator (``.`` or ``/``) and prefix."""

    rules: Sequence[Rule]
    sep: str = "."
    prefix: str = ""

    def forward(
        self, flat: Mapping[str, Array], ctx: Context | None = None
    ) -> tuple[dict[str, Array], list[str]]:
        """Source names -> (jft paths with collection, unused source names); never raises."""
        ctx = ctx or {}
        mapped: dict[str, Array] = {}
        unused: list[str] = []
        for name, value in flat.items():
            hit = self._find(name)
            if hit is None:
                unused.append(name)
                continue
            rule, values, leaf = hit
            if leaf.counter:
                continue
            value = np.asarray(value)
            if isinstance(rule.dst, tuple):  # one source tensor, equal parts along axis 0
                parts = np.split(value, len(rule.dst), axis=0)
                for dst, part in zip(rule.dst, parts, strict=True):
                    path = _join(leaf.collection, _fill(dst, values), leaf.dst, sep="/")
                    mapped[path] = leaf.to_jft(part, ctx)
            else:
                path = _join(leaf.collection, _fill(rule.dst, values), leaf.dst, sep="/")
                mapped[path] = leaf.to_jft(value, ctx)
        return mapped, unused

    def _find(self, name: str) -> tuple[Rule, dict[str, int], Leaf] | None:
        for rule in self.rules:
            for leaf in rule.kind:
                for top in (True, False) if rule.top else (False,):
                    src = _join(
                        "" if top else self.prefix.rstrip(self.sep),
                        rule.src,
                        leaf.src,
                        sep=self.sep,
                    )
                    values = _match(src, name)
                    if values is not None:
                        return rule, values, leaf
        return None

    def inverse(
        self, mapped: Mapping[str, Array], ctx: Context | None = None
    ) -> tuple[dict[str, Array], list[str]]:
        """jft paths -> (source names in this layout, jft paths no rule takes); never raises.

        The order follows the rules (then the numbers in the names), as a PyTorch
        ``state_dict`` lists modules. Values are views of ``mapped`` where the
        layout change allows, and a fused tensor is a :class:`Concatenated`
        (``np.asarray`` joins it), so nothing model-sized is copied here.
        """
        ctx = ctx or {}
        out: dict[tuple, tuple[str, Array]] = {}
        taken: set[str] = set()
        for r, rule in enumerate(self.rules):
            if rule.alias:
                continue
            dsts = rule.dst if isinstance(rule.dst, tuple) else (rule.dst,)
            for li, leaf in enumerate(rule.kind):
                if leaf.alias or leaf.counter:
                    continue
                found: dict[tuple, list[str]] = {}
                for path in mapped:
                    for d, dst in enumerate(dsts):
                        values = _match(_join(leaf.collection, dst, leaf.dst, sep="/"), path)
                        if values is not None:
                            key = tuple(sorted(values.items()))
                            found.setdefault(key, [""] * len(dsts))[d] = path
                for key, paths in found.items():
                    if not all(paths):
                        continue  # a fused tensor needs all its parts
                    values = dict(key)
                    parts = [leaf.to_src(np.asarray(mapped[p]), ctx) for p in paths]
                    value = parts[0] if len(parts) == 1 else Concatenated(parts)
                    top = rule.top or not self.prefix
                    name = _join(
                        "" if top else self.prefix.rstrip(self.sep),
                        _fill(rule.src, values),
                        leaf.src,
                        sep=self.sep,
                    )
                    order = (r, tuple(v for _, v in sorted(values.items())), li)
                    out[order] = (name, value)
                    taken.update(paths)
                    counters = [c for c in rule.kind if c.counter]
                    for c in counters:
                        cname = _join(name.rsplit(self.sep, 1)[0], c.src, sep=self.sep)
                        out[(r, order[1], len(rule.kind))] = (cname, np.zeros((), np.int64))
        flat = {name: value for _, (name, value) in sorted(out.items(), key=_order)}
        return flat, [p for p in mapped if p not in taken]


class Concatenated:
    """Arrays joined along axis 0 when read (``np.asarray``), not before.

    The export of a fused tensor (timm's ``qkv``) stays three views until its
    writer asks for it, so a file is written holding one joined tensor at a time.
    """

    def __init__(self, parts: Sequence[Array]):
        self.parts = list(parts)
        self.dtype = np.result_type(*parts)
        self.shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        self.ndim = len(self.shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> Array:
        del copy
        out = np.concatenate(self.parts, axis=0)
        return out if dtype is None else out.astype(dtype)


def _order(item: tuple[tuple, Any]) -> tuple:
    return item[0]


def names_of(rules: Iterable[Rule]) -> list[str]:
    """The source templates of ``rules`` (for docs and errors)."""
    return [r.src for r in rules]
