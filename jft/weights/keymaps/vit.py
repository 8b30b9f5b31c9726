"""Key map ``vit``: timm ``vit_*`` and Hugging Face ``ViTModel`` names -> jft ``ViT`` paths.

timm: ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.norm1``,
``blocks.N.attn.qkv`` (fused: split into query/key/value), ``blocks.N.attn.proj``,
``blocks.N.norm2``, ``blocks.N.mlp.fc1/fc2``, ``norm``, ``head``.

Hugging Face (``ViTModel``; ``ViTForImageClassification`` adds ``vit.`` and a
top-level ``classifier``): ``embeddings.patch_embeddings.projection``,
``embeddings.cls_token``, ``embeddings.position_embeddings``,
``encoder.layer.N.layernorm_before``, ``...attention.attention.{query,key,value}``,
``...attention.output.dense``, ``...layernorm_after``, ``...intermediate.dense``,
``...output.dense``, ``layernorm``, ``classifier``; also transformers 5's in-memory
names (``layers.N.attention.q_proj``, ``layers.N.mlp.fc1``...). HF's ``pooler`` has no
counterpart (the head reads the class token, as timm's) and is reported unused.

A file saved for another image size has another position grid: :func:`fit_pos_embed`
resamples it to the model's before :func:`jft.weights.restore`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jft.weights.keymaps import register
from jft.weights.keymaps.bert import find_prefix, linear_or_norm

_TIMM_ANCHOR = "patch_embed.proj.weight"
_HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"
_TIMM_LAYER = {
    "norm1": "norm1",
    "attn.proj": "attention/output",
    "norm2": "norm2",
    "mlp.fc1": "mlp/fc1",
    "mlp.fc2": "mlp/fc2",
}
_HF_LAYER = {
    "layernorm_before": "norm1",
    "attention.attention.query": "attention/query",
    "attention.attention.key": "attention/key",
    "attention.attention.value": "attention/value",
    "attention.output.dense": "attention/output",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp/fc1",
    "output.dense": "mlp/fc2",
    # transformers >= 5 in memory (its state_dict); its save_pretrained writes the names above
    "attention.q_proj": "attention/query",
    "attention.k_proj": "attention/key",
    "attention.v_proj": "attention/value",
    "attention.o_proj": "attention/output",
    "mlp.fc1": "mlp/fc1",
    "mlp.fc2": "mlp/fc2",
}
_POS = "params/backbone/embeddings/pos_embed"


def _conv(value: np.ndarray) -> np.ndarray:
    return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO


def _layout(flat: Mapping[str, np.ndarray]) -> tuple[str, str] | None:
    for layout, anchor in (("hf", _HF_ANCHOR), ("timm", _TIMM_ANCHOR)):
        prefix = find_prefix(flat, anchor)
        if prefix is not None:
            return layout, prefix
    return None


def _map(layout: str, rest: str, value: np.ndarray) -> dict[str, np.ndarray] | None:
    """One source name (without prefix) -> {jft path: array}, or None if unknown."""
    enc = "params/backbone/encoder"
    if layout == "timm":
        singles = {"cls_token": "embeddings/cls_token", "pos_embed": "embeddings/pos_embed"}
        conv, final, layer_re, table = (
            "patch_embed.proj",
            "norm",
            r"blocks\.(\d+)\.(.+)",
            _TIMM_LAYER,
        )
    else:
        singles = {
            "embeddings.cls_token": "embeddings/cls_token",
            "embeddings.position_embeddings": "embeddings/pos_embed",
        }
        conv, final = "embeddings.patch_embeddings.projection", "layernorm"
        layer_re, table = r"(?:encoder\.layer|layers)\.(\d+)\.(.+)", _HF_LAYER
    if rest in singles:
        return {f"params/backbone/{singles[rest]}": value}
    module, _, param = rest.rpartition(".")
    if module == conv:
        if param == "weight":
            return {"params/backbone/embeddings/patch_embed/kernel": _conv(value)}
        return {"params/backbone/embeddings/patch_embed/bias": value} if param == "bias" else None
    if module == final:
        target = "params/backbone/ln_final"
    elif m := re.fullmatch(layer_re, module):
        i, sub = m.groups()
        if layout == "timm" and sub == "attn.qkv":  # fused (3D, D): rows are q, then k, then v
            if param not in ("weight", "bias"):
                return None
            parts = np.split(value, 3, axis=0)
            leaf = "kernel" if param == "weight" else "bias"
            return {
                f"{enc}/layer_{i}/attention/{n}/{leaf}": (p.T if leaf == "kernel" else p)
                for n, p in zip(("query", "key", "value"), parts, strict=True)
            }
        if sub not in table:
            return None
        target = f"{enc}/layer_{i}/{table[sub]}"
    else:
        return None
    leaf = linear_or_norm(param, value)
    return None if leaf is None else {f"{target}/{leaf[0]}": leaf[1]}


@register("vit")
def convert(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps timm or Hugging Face ViT names (detected) to ``params/backbone|head/...``."""
    found = _layout(flat)
    if found is None:
        return {}, list(flat)
    layout, prefix = found
    head = "head." if layout == "timm" else "classifier."
    mapped: dict[str, np.ndarray] = {}
    unused: list[str] = []
    for name, value in flat.items():
        value = np.asarray(value)
        out = None
        if name.startswith(prefix + head) or (layout == "hf" and name.startswith(head)):
            leaf = linear_or_norm(name.rsplit(".", 1)[1], value)
            out = None if leaf is None else {f"params/head/{leaf[0]}": leaf[1]}
        elif name.startswith(prefix):
            out = _map(layout, name[len(prefix) :], value)
        if out is None:
            unused.append(name)
        else:
            mapped.update(out)
    return mapped, unused


def fit_pos_embed(
    flat: Mapping[str, np.ndarray],
    variables: Mapping[str, Any],
    grid: tuple[int, int] | None = None,
    method: str = "bicubic",
    antialias: bool = True,
) -> dict[str, np.ndarray]:
    """Returns ``flat`` with its position embedding resampled to the model's grid.

    Use it between :func:`jft.weights.read` and :func:`jft.weights.restore` when the
    model's ``image_size`` (or patch size) differs from the file's. The class-token
    part is kept; the grid part is resampled by
    :func:`jft.models.vit.resize_pos_embed` (default: timm's bicubic, antialiased;
    ``antialias=False``: Hugging Face's ``interpolate_pos_encoding``). A ``flat``
    that already fits, or holds no ViT position embedding, is returned as is.

    Args:
      flat: source name -> array, as :func:`jft.weights.read` returns.
      variables: the model's variables (for the target shape).
      grid: the model's patch grid ``(gh, gw)``; None: square. The file's grid must be square.
      method, antialias: see :func:`jft.models.vit.resize_pos_embed`.
    """
    from jft.models.vit import resize_pos_embed  # weights -> models only when used

    target = np.shape(variables["params"]["backbone"]["embeddings"]["pos_embed"])
    found = _layout(flat)
    if found is None:
        return dict(flat)
    layout, prefix = found
    name = prefix + ("pos_embed" if layout == "timm" else "embeddings.position_embeddings")
    if name not in flat or tuple(np.shape(flat[name])) == tuple(target):
        return dict(flat)
    if grid is None:
        side = int(round((target[1] - 1) ** 0.5))
        grid = (side, side)
    out = dict(flat)
    out[name] = np.asarray(resize_pos_embed(flat[name], grid, method=method, antialias=antialias))
    return out
