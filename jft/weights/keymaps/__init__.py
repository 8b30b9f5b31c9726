"""Per-architecture key maps: source checkpoint names <-> jft variable paths.

A key map is a function ``convert(flat) -> (mapped, unused)``:

- ``flat`` maps source names (``layer1.0.conv1.weight``) to ``np.ndarray``;
- ``mapped`` maps jft variable paths, with the collection first
  (``params/backbone/layer1_0/conv1/kernel``,
  ``batch_stats/backbone/layer1_0/bn1/mean``), to arrays already in Flax
  layout (kernels transposed, LayerNorm weight as ``scale``);
- ``unused`` lists the source names the map did not use.

A key map may accept several source layouts (torchvision/timm, Hugging Face,
Keras) and detect which one ``flat`` is in. It never raises for an unknown key:
it reports it in ``unused``, and :func:`jft.weights.restore` decides.

Its inverse, ``export(mapped, layout) -> (flat, unused)``, writes jft variables
back under a source layout's names (``"hf"``, ``"timm"``, ``"torchvision"``,
``"keras"``), in that layout's tensor shapes. Both directions read one table per
architecture (:mod:`jft.weights.keymaps._table`), so they cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from jft._registry import Registry

__all__ = [
    "EXPORTS",
    "KEYMAPS",
    "Inverse",
    "KeyMap",
    "get",
    "inverse",
    "layouts",
    "names",
    "register",
    "register_inverse",
]

KeyMap = Callable[[Mapping[str, np.ndarray]], tuple[dict[str, np.ndarray], list[str]]]
Inverse = Callable[[Mapping[str, np.ndarray], str], tuple[dict[str, np.ndarray], list[str]]]
KEYMAPS: Registry[KeyMap] = Registry("arch")
"""Architecture -> key map (import direction)."""
EXPORTS: Registry[tuple[Inverse, tuple[str, ...]]] = Registry("export arch")
"""Architecture -> (inverse key map, the source layouts it writes)."""


def register(arch: str) -> Callable[[KeyMap], KeyMap]:
    """Registers a key map for ``arch`` (a decorator)."""
    return KEYMAPS.register(arch)


def get(arch: str) -> KeyMap:
    """Returns the key map of ``arch``; an ``UnknownNameError`` lists the known ones."""
    return KEYMAPS.get(arch)


def register_inverse(arch: str, layouts: tuple[str, ...]) -> Callable[[Inverse], Inverse]:
    """Registers the export direction of ``arch``'s key map and the layouts it writes."""

    def wrap(fn: Inverse) -> Inverse:
        EXPORTS.register(arch)((fn, tuple(layouts)))
        return fn

    return wrap


def inverse(arch: str) -> Inverse:
    """The export direction of ``arch``'s key map; an ``UnknownNameError`` lists the known ones."""
    return EXPORTS.get(arch)[0]


def layouts(arch: str) -> tuple[str, ...]:
    """The source layouts ``arch`` exports to (empty: none)."""
    return EXPORTS.get(arch)[1] if arch in EXPORTS else ()


def names() -> list[str]:
    """The architectures that have a key map, sorted."""
    return KEYMAPS.names()


from jft.weights.keymaps import bert, gpt2, jft, llama, resnet, vgg, vit  # noqa: E402, F401  (registers the key maps)
