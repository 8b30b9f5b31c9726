"""Key map ``vit``: timm ``vit_*`` and Hugging Face ``ViTModel`` names <-> jft ``ViT`` paths.

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

Export writes layout ``"timm"`` (fused ``qkv``) or ``"hf"`` (``ViTModel`` names, or
``ViTForImageClassification``'s with a head); both from the tables below.

A file saved for another image size has another position grid: :func:`fit_pos_embed`
resamples it to the model's before :func:`jft.weights.restore`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jft.weights.keymaps import register, register_inverse
from jft.weights.keymaps._hf import find_prefix
from jft.weights.keymaps._table import CONV, LINEAR, NORM, TENSOR, Rule, Table

__all__ = ["HEAD_PREFIX", "HF_RULES", "TIMM_RULES", "convert", "export", "fit_pos_embed"]

_TIMM_ANCHOR = "patch_embed.proj.weight"
_HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"
_L = "backbone/encoder/layer_{i}"
_EMB = "backbone/embeddings"
TIMM_RULES = (
    Rule("cls_token", f"{_EMB}/cls_token", TENSOR),
    Rule("pos_embed", f"{_EMB}/pos_embed", TENSOR),
    Rule("patch_embed.proj", f"{_EMB}/patch_embed", CONV),
    Rule("blocks.{i}.norm1", f"{_L}/norm1", NORM),
    Rule(  # fused (3D, D): rows are q, then k, then v
        "blocks.{i}.attn.qkv",
        (f"{_L}/attention/query", f"{_L}/attention/key", f"{_L}/attention/value"),
        LINEAR,
    ),
    Rule("blocks.{i}.attn.proj", f"{_L}/attention/output", LINEAR),
    Rule("blocks.{i}.norm2", f"{_L}/norm2", NORM),
    Rule("blocks.{i}.mlp.fc1", f"{_L}/mlp/fc1", LINEAR),
    Rule("blocks.{i}.mlp.fc2", f"{_L}/mlp/fc2", LINEAR),
    Rule("norm", "backbone/ln_final", NORM),
    Rule("head", "head", LINEAR),
)
_HF_L = "encoder.layer.{i}"
_HF5_L = "layers.{i}"  # transformers >= 5 in memory (its state_dict); import only
HF_RULES = (
    Rule("embeddings.cls_token", f"{_EMB}/cls_token", TENSOR),
    Rule("embeddings.position_embeddings", f"{_EMB}/pos_embed", TENSOR),
    Rule("embeddings.patch_embeddings.projection", f"{_EMB}/patch_embed", CONV),
    Rule(f"{_HF_L}.layernorm_before", f"{_L}/norm1", NORM),
    Rule(f"{_HF_L}.attention.attention.query", f"{_L}/attention/query", LINEAR),
    Rule(f"{_HF_L}.attention.attention.key", f"{_L}/attention/key", LINEAR),
    Rule(f"{_HF_L}.attention.attention.value", f"{_L}/attention/value", LINEAR),
    Rule(f"{_HF_L}.attention.output.dense", f"{_L}/attention/output", LINEAR),
    Rule(f"{_HF_L}.layernorm_after", f"{_L}/norm2", NORM),
    Rule(f"{_HF_L}.intermediate.dense", f"{_L}/mlp/fc1", LINEAR),
    Rule(f"{_HF_L}.output.dense", f"{_L}/mlp/fc2", LINEAR),
    Rule("layernorm", "backbone/ln_final", NORM),
    Rule("classifier", "head", LINEAR, top=True),
    Rule(f"{_HF5_L}.layernorm_before", f"{_L}/norm1", NORM, alias=True),
    Rule(f"{_HF5_L}.attention.q_proj", f"{_L}/attention/query", LINEAR, alias=True),
    Rule(f"{_HF5_L}.attention.k_proj", f"{_L}/attention/key", LINEAR, alias=True),
    Rule(f"{_HF5_L}.attention.v_proj", f"{_L}/attention/value", LINEAR, alias=True),
    Rule(f"{_HF5_L}.attention.o_proj", f"{_L}/attention/output", LINEAR, alias=True),
    Rule(f"{_HF5_L}.layernorm_after", f"{_L}/norm2", NORM, alias=True),
    Rule(f"{_HF5_L}.mlp.fc1", f"{_L}/mlp/fc1", LINEAR, alias=True),
    Rule(f"{_HF5_L}.mlp.fc2", f"{_L}/mlp/fc2", LINEAR, alias=True),
)
HEAD_PREFIX = "vit."  # ViTForImageClassification keeps the encoder under this prefix
_RULES = {"timm": TIMM_RULES, "hf": HF_RULES}


def _layout(flat: Mapping[str, np.ndarray]) -> tuple[str, str] | None:
    for layout, anchor in (("hf", _HF_ANCHOR), ("timm", _TIMM_ANCHOR)):
        prefix = find_prefix(flat, anchor)
        if prefix is not None:
            return layout, prefix
    return None


@register("vit")
def convert(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps timm or Hugging Face ViT names (detected) to ``params/backbone|head/...``."""
    found = _layout(flat)
    if found is None:
        return {}, list(flat)
    layout, prefix = found
    return Table(_RULES[layout], prefix=prefix).forward(flat)


@register_inverse("vit", layouts=("hf", "timm"))
def export(
    mapped: Mapping[str, np.ndarray], layout: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """jft ViT variables -> timm names, or HF ``ViTModel`` / ``ViTForImageClassification`` names."""
    if layout not in _RULES:
        raise ValueError(f"vit exports to layouts 'hf' and 'timm', not {layout!r}")
    has_head = any(p.startswith("params/head/") for p in mapped)
    prefix = HEAD_PREFIX if layout == "hf" and has_head else ""
    return Table(_RULES[layout], prefix=prefix).inverse(mapped)


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
