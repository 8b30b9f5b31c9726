"""Key map ``bert``: Hugging Face BERT names -> :class:`jft.models.bert.Bert` paths.

Accepts ``BertModel`` names (``embeddings.word_embeddings.weight``,
``encoder.layer.0.attention.self.query.weight``, ``pooler.dense.weight``), as
sentence-transformers folders store them, and ``BertFor*`` names, which add a
prefix (``bert.``) and a top-level ``classifier`` (mapped to ``head/``). Old
TF-converted checkpoints that name LayerNorm parameters ``gamma``/``beta`` work too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from jft.weights.keymaps import register

_ANCHOR = "embeddings.word_embeddings.weight"
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_LAYER_MODULES = {
    "attention.self.query": "attention/query",
    "attention.self.key": "attention/key",
    "attention.self.value": "attention/value",
    "attention.output.dense": "attention/output",
    "attention.output.LayerNorm": "attention_layer_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_layer_norm",
}
_TOP_MODULES = {
    "embeddings.LayerNorm": "backbone/embeddings/layer_norm",
    "pooler.dense": "backbone/pooler",
}
_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def find_prefix(flat: Mapping[str, np.ndarray], anchor: str) -> str | None:
    """The prefix before ``anchor`` in ``flat``'s names (``""``, ``"bert."``...), or None."""
    for name in flat:
        if name.endswith(anchor):
            return name[: -len(anchor)]
    return None


def linear_or_norm(param: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
    """A PyTorch Linear/LayerNorm parameter -> its Flax name and layout, or None.

    A 2-D ``weight`` is a Linear kernel, transposed (out, in) -> (in, out); a 1-D
    ``weight`` (or ``gamma``) is a LayerNorm ``scale``; ``bias`` (or ``beta``) stays.
    """
    if param in ("weight", "gamma"):
        return ("kernel", value.T) if value.ndim == 2 else ("scale", value)
    if param in ("bias", "beta"):
        return "bias", value
    return None


def _map_module(module: str, param: str, value: np.ndarray, table: Mapping[str, str]):
    if module not in table:
        return None
    leaf = linear_or_norm(param, value)
    if leaf is None:
        return None
    return f"params/{table[module]}/{leaf[0]}", leaf[1]


@register("bert")
def convert(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps Hugging Face BERT names to ``params/backbone/...`` and ``params/head/...``."""
    prefix = find_prefix(flat, _ANCHOR)
    if prefix is None:
        return {}, list(flat)
    mapped: dict[str, np.ndarray] = {}
    unused: list[str] = []
    for name, value in flat.items():
        value = np.asarray(value)
        out = None
        if name.startswith("classifier."):  # BertForSequenceClassification's head: no prefix
            out = _map_module("classifier", name.split(".", 1)[1], value, {"classifier": "head"})
        elif name.startswith(prefix):
            rest = name[len(prefix) :]
            module, _, param = rest.rpartition(".")
            if m := _LAYER.fullmatch(module):
                i, sub = m.groups()
                table = {k: f"backbone/encoder/layer_{i}/{v}" for k, v in _LAYER_MODULES.items()}
                out = _map_module(sub, param, value, table)
            elif module.startswith("embeddings.") and module[len("embeddings.") :] in _EMBEDDINGS:
                if param == "weight":
                    out = f"params/backbone/{module.replace('.', '/')}/embedding", value
            else:
                out = _map_module(module, param, value, _TOP_MODULES)
        if out is None:
            unused.append(name)
        else:
            mapped[out[0]] = out[1]
    return mapped, unused
