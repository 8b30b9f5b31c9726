"""What a LoRA adapter is: its hyperparameters, its targets, and where its parameters live.

A LoRA adapter on a module with kernel :math:`W` (``in -> out``) adds
:math:`s \\, x A B` to the module's output, with :math:`A` ``(in, r)``,
:math:`B` ``(r, out)`` and :math:`s = \\alpha / r` (rsLoRA: :math:`\\alpha /
\\sqrt{r}`). Its parameters sit next to the kernel they adapt, in the same
module (``backbone/encoder/layer_0/attention/query/lora_A``), so one regex rule
(:func:`adapter_rules`) trains them and freezes everything else.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jft._paths import filter_leaves, flatten
from jft.errors import JftError

__all__ = [
    "ADAPTER_LEAVES",
    "ADAPTER_REGEX",
    "VARIANTS",
    "LoraConfig",
    "LoraError",
    "adapter_rules",
    "adapters",
    "resolve_targets",
    "strip_adapters",
]

VARIANTS = ("lora", "rslora", "dora", "rsdora")
"""``lora``: scale alpha/r; ``rslora``: alpha/sqrt(r); ``dora``: LoRA plus a learned
magnitude per output feature (Liu et al., 2024); ``rsdora``: DoRA with rsLoRA's scale."""

ADAPTER_LEAVES = ("lora_A", "lora_B", "lora_magnitude")
"""The names of the adapter parameters inside an adapted module."""

ADAPTER_REGEX = r".*/lora_(A|B|magnitude)"
"""Fully matches the path of every adapter parameter, and of nothing else."""

_MAX_LISTED = 6


class LoraError(JftError, ValueError):
    """A LoRA configuration, target or adapter file that does not fit; one line says which."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A LoRA adapter's hyperparameters (Hu et al., 2021), as PEFT's ``LoraConfig``.

    Attributes:
      targets: regexes, each fully matched against the module paths of the model's
        parameters (``backbone/encoder/layer_\\d+/attention/(query|value)``; a
        trailing ``/kernel`` is allowed). Each must match at least one module,
        and each matched module must be a ``Dense``, ``DenseGeneral`` or ``Conv``.
      rank: :math:`r`, the inner dimension of :math:`A B`.
      alpha: :math:`\\alpha` (PEFT's ``lora_alpha``).
      dropout: dropout on the adapter's input, in training only (PEFT's ``lora_dropout``).
      variant: one of :data:`VARIANTS`.
      quantize: ``""``, or how :func:`jft.peft.quantize_base` stores the frozen
        base's kernels: ``int8`` or ``nf4`` (QLoRA). Not part of the adapter file.
    """

    targets: tuple[str, ...]
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    variant: str = "lora"
    quantize: str = ""

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if not targets:
            raise LoraError("lora.targets is empty: give regexes of the module paths to adapt")
        for t in targets:
            try:
                re.compile(t)
            except re.error as e:
                raise LoraError(f"lora.targets: {t!r} is not a regex ({e}); fix the pattern") from e
        if int(self.rank) != self.rank or self.rank < 1:
            raise LoraError(f"lora.rank={self.rank!r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        if self.variant not in VARIANTS:
            raise LoraError(f"lora.variant={self.variant!r} is unknown; use one of {VARIANTS}")
        if self.quantize not in ("", "int8", "nf4"):
            raise LoraError(
                f"lora.quantize={self.quantize!r} is unknown; use '' (a float base), "
                "'int8' or 'nf4'"
            )

    @property
    def scale(self) -> float:
        """:math:`\\alpha / r`, or :math:`\\alpha / \\sqrt{r}` for rsLoRA (Kalajdzievski, 2023)."""
        if self.use_rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    @property
    def use_rslora(self) -> bool:
        """Whether the scale is rsLoRA's."""
        return self.variant in ("rslora", "rsdora")

    @property
    def use_dora(self) -> bool:
        """Whether the adapter is DoRA's (a learned magnitude per output feature)."""
        return self.variant in ("dora", "rsdora")


def _is_adapter(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ADAPTER_LEAVES


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def resolve_targets(params: Mapping[str, Any], config: LoraConfig) -> tuple[str, ...]:
    """The paths of the modules that ``config.targets`` adapt in ``params``, in tree order.

    Raises:
      LoraError: a target regex that matches no module, or a matched module that
        holds no kernel (a LayerNorm, an embedding): LoRA cannot adapt it.
    """
    modules: dict[str, list[str]] = {}
    for path in flatten(params):
        module, _, leaf = path.rpartition("/")
        if not _is_adapter(path):
            modules.setdefault(module, []).append(leaf)
    found: list[str] = []
    for target in config.targets:
        pattern = re.compile(target)
        hits = [m for m in modules if pattern.fullmatch(m) or pattern.fullmatch(f"{m}/kernel")]
        if not hits:
            raise LoraError(
                f"lora.targets: {target!r} matches no module path; the modules with a "
                f"kernel are {_listing([m for m, leaves in modules.items() if 'kernel' in leaves])}"
            )
        for m in hits:
            if "kernel" not in modules[m]:
                raise LoraError(
                    f"lora.targets: {target!r} matches {m!r}, which holds "
                    f"{'/'.join(sorted(modules[m]))} and no kernel; LoRA adapts Dense, "
                    "DenseGeneral and Conv kernels: narrow the regex"
                )
            if m not in found:
                found.append(m)
    order = list(modules)
    return tuple(sorted(found, key=order.index))


def adapters(params: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter parameters of ``params`` alone (a nested dict, same paths)."""
    return filter_leaves(params, _is_adapter)


def strip_adapters(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without its adapter parameters: the base model's tree (same arrays)."""
    return filter_leaves(params, lambda p: not _is_adapter(p))


def adapter_rules(optimizer: Any, *, also: Sequence[str] = ()) -> list[tuple[str, Any]]:
    """Partition rules that train the adapters (and ``also``, e.g. a new head) with ``optimizer``.

    Everything else is frozen: :mod:`jft.partition` then keeps no optimizer state
    for it and the train step computes no gradient for it.

    >>> [regex for regex, _ in adapter_rules(None, also=["head/.*"])]
    ['.*/lora_(A|B|magnitude)', 'head/.*', '.*']
    """
    return [(ADAPTER_REGEX, optimizer), *((r, optimizer) for r in also), (".*", None)]
