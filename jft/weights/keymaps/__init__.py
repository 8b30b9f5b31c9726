"""Per-architecture key maps: source checkpoint names -> jft variable paths.

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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

KeyMap = Callable[[Mapping[str, np.ndarray]], tuple[dict[str, np.ndarray], list[str]]]
_KEYMAPS: dict[str, KeyMap] = {}


def register(arch: str) -> Callable[[KeyMap], KeyMap]:
    """Registers a key map for ``arch`` (a decorator)."""

    def wrap(fn: KeyMap) -> KeyMap:
        _KEYMAPS[arch] = fn
        return fn

    return wrap


def get(arch: str) -> KeyMap:
    """Returns the key map of ``arch``; a ``ValueError`` lists the known ones."""
    if arch not in _KEYMAPS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(sorted(_KEYMAPS))}")
    return _KEYMAPS[arch]


def names() -> list[str]:
    """The architectures that have a key map, sorted."""
    return sorted(_KEYMAPS)


from jft.weights.keymaps import bert, jft, resnet, vgg, vit  # noqa: E402, F401  (registers the key maps)
