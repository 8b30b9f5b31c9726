"""The key maps of Hugging Face layouts found by one anchor tensor (BERT, GPT-2, Llama).

Each such map reads its rules one way on import, wherever the anchor's prefix
puts them (``bert.``, ``transformer.``, ``model.`` or none), and the other way
on export, under the prefix of the class it writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from jft.weights.keymaps import Inverse, KeyMap, register, register_inverse
from jft.weights.keymaps._table import Rule, Table

__all__ = ["find_prefix", "hf_keymap"]


def find_prefix(flat: Mapping[str, np.ndarray], anchor: str) -> str | None:
    """The prefix before ``anchor`` in ``flat``'s names (``""``, ``"bert."``...), or None."""
    for name in flat:
        if name.endswith(anchor):
            return name[: -len(anchor)]
    return None


def hf_keymap(
    arch: str, rules: Sequence[Rule], anchor: str, prefix: str, *, head_only: bool = False
) -> tuple[KeyMap, Inverse]:
    """Registers ``arch``'s key map and its export (layout ``"hf"``); returns both.

    Args:
      arch: the key map's name.
      rules: the table, in names without a prefix.
      anchor: a tensor every file of the layout holds (``wte.weight``); its prefix
        is the file's.
      prefix: what export writes before the names.
      head_only: export writes ``prefix`` only when the variables hold a ``head/``
        (``BertForSequenceClassification``; ``BertModel`` has none).
    """

    @register(arch)
    def convert(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
        found = find_prefix(flat, anchor)
        if found is None:
            return {}, list(flat)
        return Table(rules, prefix=found).forward(flat)

    @register_inverse(arch, layouts=("hf",))
    def export(
        mapped: Mapping[str, np.ndarray], layout: str = "hf"
    ) -> tuple[dict[str, np.ndarray], list[str]]:
        if layout != "hf":
            raise ValueError(f"{arch} exports to layout 'hf', not {layout!r}")
        has_head = any(p.startswith("params/head/") for p in mapped)
        return Table(rules, prefix=prefix if has_head or not head_only else "").inverse(mapped)

    convert.__doc__ = f"Maps Hugging Face {arch} names (any prefix) to jft variable paths."
    where = f"``{prefix}``" + (" when they hold a head" if head_only else "")
    export.__doc__ = f"jft {arch} variables -> Hugging Face names, prefixed by {where}."
    return convert, export
