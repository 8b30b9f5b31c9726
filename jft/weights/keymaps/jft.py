"""The identity key map: files that already use jft variable paths.

:func:`jft.train.export` and :func:`jft.weights.convert` write arrays named by
their jft paths (``params/backbone/conv1/kernel``, ``batch_stats/...``); a name
without a collection (``backbone/conv1/kernel``) is taken as a parameter.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jft.weights.keymaps import register

__all__ = ["convert"]

_COLLECTIONS = ("params/", "batch_stats/")
_ROOTS = ("backbone/", "head/")


@register("jft")
def convert(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps ``flat`` to itself, adding ``params/`` to names without a collection.

    Names under a collection (``params/fc/kernel``) are jft paths; a bare name is
    one only under ``backbone/`` or ``head/``. Anything else is left unused, so
    other layouts (Keras's ``block1_conv1/kernel``) are not taken for jft's.
    """
    mapped, unused = {}, []
    for name, value in flat.items():
        path = name if name.startswith(_COLLECTIONS) else "params/" + name
        if not name.startswith(_COLLECTIONS) and not name.startswith(_ROOTS):
            unused.append(name)
            continue
        mapped[path] = np.asarray(value)
    return mapped, unused
