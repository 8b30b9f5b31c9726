"""Which modules of a saved model carry adapters, and how much of it trains: for ``jft inspect``.

Works from parameter paths and shapes alone (a checkpoint's metadata, a weights
file's header), so nothing is restored or built.

>>> s = summarize({
...     "enc/query/kernel": ((16, 16), "frozen"),
...     "enc/query/lora_A": ((16, 4), "trainable"),
...     "enc/query/lora_B": ((4, 16), "trainable"),
...     "head/kernel": ((16, 2), "trainable"),
... })
>>> s.modules
(('enc/query', 4, (16, 16), 'lora'),)
>>> print("\\n".join(s.lines()))
adapters on 1 module (LoRA, rank 4), 128 parameters:
  enc/query  kernel 16x16  r=4
trainable: 160 of 416 parameters (38.46%): 128 in adapters, 32 elsewhere
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

from jft.peft.config import ADAPTER_LEAVES

__all__ = ["AdapterSummary", "summarize", "summarize_arrays"]


@dataclasses.dataclass(frozen=True)
class AdapterSummary:
    """The adapters of a parameter tree, and its trainable fraction.

    Attributes:
      modules: ``(module path, rank, kernel shape, "lora" | "dora")`` of each adapted
        module, in the order given.
      adapter_params: the number of adapter values (``lora_A``, ``lora_B``, ``lora_magnitude``).
      total: the number of parameter values, adapters included.
      trainable: the number of trainable values, or None when not known.
    """

    modules: tuple[tuple[str, int, tuple[int, ...], str], ...]
    adapter_params: int
    total: int
    trainable: int | None

    def lines(self) -> list[str]:
        """The summary as ``jft inspect`` prints it."""
        out = []
        if self.modules:
            kinds = sorted({kind for *_, kind in self.modules})
            ranks = sorted({rank for _, rank, *_ in self.modules})
            what = "/".join("DoRA" if k == "dora" else "LoRA" for k in kinds)
            n = len(self.modules)
            out.append(
                f"adapters on {n} module{'s' if n != 1 else ''} ({what}, rank "
                f"{'/'.join(map(str, ranks))}), {self.adapter_params:,} parameters:"
            )
            width = max(len(m) for m, *_ in self.modules)
            for module, rank, shape, _ in self.modules:
                kernel = "x".join(map(str, shape)) if shape else "?"
                out.append(f"  {module:<{width}}  kernel {kernel}  r={rank}")
        elif self.trainable is not None:
            out.append("adapters: none")
        if self.trainable is not None and self.total:
            rest = self.trainable - self.adapter_params
            tail = (
                f": {self.adapter_params:,} in adapters, {rest:,} elsewhere" if self.modules else ""
            )
            out.append(
                f"trainable: {self.trainable:,} of {self.total:,} parameters "
                f"({self.trainable / self.total:.2%}){tail}"
            )
        return out


def summarize(
    params: Mapping[str, tuple[Sequence[int], str | None]],
) -> AdapterSummary:
    """Summarizes ``path -> (shape, status)`` of a model's parameters.

    Args:
      params: every parameter's path (``backbone/.../query/lora_A``, no ``params/``
        prefix), shape, and ``"trainable"``, ``"frozen"`` or None (not known).

    Returns:
      An :class:`AdapterSummary`; its ``trainable`` is None unless every status is known.
    """
    adapted: dict[str, dict[str, tuple[int, ...]]] = {}
    kernels: dict[str, tuple[int, ...]] = {}
    total, trainable, known, adapter_params = 0, 0, True, 0
    for path, (shape, status) in params.items():
        module, _, leaf = path.rpartition("/")
        size = math.prod(int(d) for d in shape)
        total += size
        trainable += size if status == "trainable" else 0
        known = known and status in ("trainable", "frozen")
        if leaf in ADAPTER_LEAVES:
            adapted.setdefault(module, {})[leaf] = tuple(int(d) for d in shape)
            adapter_params += size
        elif leaf == "kernel":
            kernels[module] = tuple(int(d) for d in shape)
    modules = tuple(
        (
            module,
            leaves["lora_B"][0] if "lora_B" in leaves else leaves.get("lora_A", (0,))[-1],
            kernels.get(module, ()),
            "dora" if "lora_magnitude" in leaves else "lora",
        )
        for module, leaves in adapted.items()
    )
    return AdapterSummary(modules, adapter_params, total, trainable if known else None)


_STATE_PREFIXES = {"trainable/": "trainable", "frozen/": "frozen", "params/": None}


def summarize_arrays(
    arrays: Mapping[str, tuple[Sequence[int], str]],
    *,
    base: Mapping[str, Sequence] | None = None,
    is_frozen: Callable[[str], bool] | None = None,
) -> AdapterSummary:
    """:func:`summarize` of what ``jft inspect`` reads: a checkpoint's or a weights file's arrays.

    Args:
      arrays: ``name -> (shape, dtype)``; a checkpoint's ``trainable/...`` and
        ``frozen/...`` say their status, ``params/...`` (a weights file, an export)
        is frozen or trainable as ``is_frozen`` says (unknown without it), and
        anything else (optimizer state, step) is not a parameter.
      base: an adapter-only checkpoint's frozen base, ``path -> [checksum, shape, dtype]``
        (the ``arrays`` of its ``base`` item), whose arrays are not in ``arrays``.
      is_frozen: the run's partition rules as a predicate over parameter paths.
    """
    params: dict[str, tuple[Sequence[int], str | None]] = {}
    dtypes: dict[str, str] = {}
    for name, (shape, dtype) in arrays.items():
        for prefix, status in _STATE_PREFIXES.items():
            if name.startswith(prefix):
                path = name.removeprefix(prefix)
                if status is None and is_frozen is not None:
                    status = "frozen" if is_frozen(path) else "trainable"
                params[path], dtypes[path] = (shape, status), str(dtype)
    for path, (_, shape, dtype) in (base or {}).items():
        path = path.removeprefix("frozen/")
        if path not in params:
            params[path], dtypes[path] = (shape, "frozen"), str(dtype)
    return summarize(_as_weights(params, dtypes))


def _as_weights(
    params: dict[str, tuple[Sequence[int], str | None]], dtypes: Mapping[str, str]
) -> dict[str, tuple[Sequence[int], str | None]]:
    """A quantized base (:func:`jft.peft.quantize_base`) counted in weights, not codes:
    packed nf4 codes (``uint8``) hold two weights a byte, and scales are not weights."""
    out = {}
    for path, (shape, status) in params.items():
        module, _, leaf = path.rpartition("/")
        if leaf == "kernel_scale":
            continue
        if leaf == "kernel" and f"{module}/kernel_scale" in params and dtypes[path] == "uint8":
            shape = (2 * int(shape[0]), *shape[1:])
        out[path] = (shape, status)
    return out
