"""Export jft variables to the formats their source frameworks load.

:func:`export` writes a model's variables as a Hugging Face folder, a timm or
torchvision state dict, a Keras ``.h5``, or in jft's own names (safetensors, npz,
orbax). Names and layouts come from the architecture's key-map table read
backwards (:func:`jft.weights.keymaps.inverse`), the same table that imports them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np
from flax import traverse_util

from jft.weights import hf_folder, keymaps, writers
from jft.weights.convert import infer_arch, save_checkpoint
from jft.weights.readers import read
from jft.weights.restore import WeightsError

__all__ = ["FORMATS", "export"]

FORMATS = ("hf", "timm", "torchvision", "keras", "safetensors", "npz", "orbax")
"""``--format`` values: source layouts first, then jft's own names."""

_SUFFIXES = {
    "timm": (".safetensors", ".pth"),
    "torchvision": (".safetensors", ".pth"),
    "keras": (".h5",),
    "safetensors": (".safetensors",),
    "npz": (".npz",),
}


def export(
    src: str | os.PathLike | Mapping[str, Any],
    dest: str | os.PathLike,
    format: str,
    *,
    arch: str | None = None,
    model: nn.Module | None = None,
    like: str | os.PathLike | None = None,
    labels: Sequence[str] | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> str:
    """Writes the variables at ``src`` to ``dest`` in ``format``; returns ``dest``'s absolute path.

    Formats:

    - ``"hf"``: a Hugging Face folder, ``config.json`` and ``model.safetensors``
      (shards and ``model.safetensors.index.json`` above ``max_shard_size``), that
      ``transformers.AutoModel*.from_pretrained`` loads: ``BertModel`` /
      ``ViTModel`` / ``ResNetModel``, or with a ``head/`` the matching
      ``*ForSequenceClassification`` / ``*ForImageClassification`` with
      ``num_labels`` and ``id2label``; a decoder (GPT-2, Llama, Mistral, Qwen2,
      Qwen3, Gemma, Gemma 2) as its ``*ForCausalLM`` for
      ``AutoModelForCausalLM``, tied embeddings without ``lm_head.weight`` (see
      :mod:`jft.weights.hf_decoder`). The config comes from ``like`` (a Hugging
      Face folder; ``src`` itself when it is one) and/or from ``model``; the
      tokenizer and sentence-transformers files of that folder are copied, and
      its tensors that jft does not model (a pooler, ``position_ids``) are
      carried over unchanged (a headless ViT with no such folder has no pooler:
      load it with ``ViTModel.from_pretrained(dest, add_pooling_layer=False)``);
    - ``"timm"`` / ``"torchvision"``: a state dict, ``.safetensors`` or ``.pth``
      (by ``dest``'s suffix; ``.pth`` needs torch), for ``load_state_dict``;
    - ``"keras"``: a legacy ``.h5`` that the Keras model loads with
      ``load_weights(dest)`` or ``load_weights(dest, by_name=True)``;
    - ``"safetensors"``, ``"npz"``, ``"orbax"``: jft's own names
      (``params/backbone/...``), as :func:`jft.train.export` writes them.

    Nothing is written unless every check passes; files are written tensor by
    tensor to a temporary name in ``dest``'s folder and renamed into place.

    Args:
      src: variables (``{"params": ..., "batch_stats": ...}`` or flat jft paths),
        or anything :func:`jft.weights.read` takes: a weights file, a Hugging Face
        folder, an orbax folder of variables (import-then-export round trip).
      dest: the file or folder to create.
      format: one of :data:`FORMATS`.
      arch: the key map (``bert``, ``vit``, ``resnet``, ``vgg``, ``gpt2``,
        ``llama``); default: from
        ``model``, else from the variable paths.
      model: the jft model the variables belong to (fills ``config.json``).
      like: a Hugging Face folder whose config, tokenizer and extra tensors to reuse.
      labels: class names of the head, in order (``id2label``); default ``LABEL_i``.
      dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"`` for floating tensors
        (an hf ``config.json`` says it as ``dtype``); None keeps each tensor's.
      max_shard_size: ``"hf"`` shard size (``"5GB"``, ``"200MB"`` or bytes).
      overwrite: replace an existing ``dest``.

    Raises:
      WeightsError: one line: an unknown format, a family/format pair that does
        not exist, ``dest`` exists or cannot be written, variables the layout has
        no name for, or a ``config.json`` that cannot be made.
    """
    dest = os.path.abspath(os.fspath(dest))
    if format not in FORMATS:
        raise WeightsError(f"unknown export format {format!r}; formats: {', '.join(FORMATS)}")
    np_dtype = _dtype(dtype, format)
    _check_dest(dest, format, overwrite)
    try:
        max_bytes = writers.parse_size(max_shard_size)
    except ValueError as e:
        raise WeightsError(f"max_shard_size: {e}") from None
    mapped, source_flat, folder = _load(src, arch)
    like = os.fspath(like) if like is not None else folder
    if format in ("safetensors", "npz", "orbax"):
        return _write(dest, format, mapped, np_dtype, max_bytes, overwrite)
    arch = arch or _arch_of_model(model) or _arch_of_paths(mapped)
    if format not in keymaps.layouts(arch):
        exports = ", ".join((*keymaps.layouts(arch), "safetensors", "npz", "orbax"))
        raise WeightsError(
            f"a {arch} model does not export to format {format!r}; it exports to {exports}"
        )
    flat, left = keymaps.inverse(arch)(mapped, format)
    if left:
        raise WeightsError(
            f"{left[0]} (and {len(left) - 1} more): no {format} name for it in the {arch} "
            "key map; export to safetensors/npz/orbax to keep jft's names"
        )
    config = None
    if format == "hf":
        config = hf_folder.hf_config(arch, mapped, model, like, labels)
        if like is not None and arch in hf_folder.HF_PREFIX:
            flat = {**flat, **hf_folder.carried_tensors(arch, flat, like, source_flat)}
        config.pop("torch_dtype", None)  # transformers 5's name is dtype
        written = {writers.out_dtype(v, np_dtype).name for v in flat.values()}
        floats = sorted(written & {"float64", *writers.DTYPES})
        if len(floats) == 1:
            config["dtype"] = floats[0]
    return _write(dest, format, flat, np_dtype, max_bytes, overwrite, config=config, like=like)


def _dtype(dtype: str | None, format: str) -> np.dtype | None:
    if dtype is None:
        return None
    if dtype not in writers.DTYPES:
        raise WeightsError(f"dtype {dtype!r}: choose one of {', '.join(writers.DTYPES)}")
    if dtype == "bfloat16" and format in ("keras", "npz"):
        raise WeightsError(f"format {format!r} cannot hold bfloat16; use float16 or float32")
    return writers.DTYPES[dtype]


def _check_dest(dest: str, format: str, overwrite: bool) -> None:
    suffixes = _SUFFIXES.get(format)
    if suffixes and not dest.lower().endswith(suffixes):
        raise WeightsError(
            f"{dest}: a {format} export is a {' or '.join(suffixes)} file; name it so"
        )
    if os.path.lexists(dest) and not overwrite:
        raise WeightsError(f"{dest}: already exists; pass --overwrite (overwrite=True) to replace")
    parent = os.path.dirname(dest)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise WeightsError(f"{dest}: cannot write there ({parent} is not a writable folder)")


def _load(
    src: str | os.PathLike | Mapping[str, Any], arch: str | None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str | None]:
    """(jft variables flat, the source's own tensors, the source HF folder or None)."""
    if isinstance(src, Mapping):
        nested = any(isinstance(v, Mapping) for v in src.values())
        flat = traverse_util.flatten_dict(dict(src), sep="/") if nested else dict(src)
        mapped, unused = keymaps.get("jft")(flat)
        if unused:
            raise WeightsError(f"variables: {unused[0]} is not a jft path (params/backbone/...)")
        return mapped, {}, None
    path = os.fspath(src)
    source = read(path)
    source_arch = "jft" if _is_jft(source) else (arch or infer_arch(source))
    mapped, _ = keymaps.get(source_arch)(source)
    if not mapped:
        raise WeightsError(f"{path}: no array fits arch={source_arch!r}; is arch right?")
    is_hf = os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))
    return mapped, (source if source_arch != "jft" else {}), (path if is_hf else None)


def _is_jft(flat: Mapping[str, np.ndarray]) -> bool:
    mapped, unused = keymaps.get("jft")(flat)
    return bool(mapped) and not unused


def _arch_of_model(model: nn.Module | None) -> str | None:
    if model is None:
        return None
    from jft import models

    kinds = {models.Bert: "bert", models.ViT: "vit", models.ResNet: "resnet"}
    kinds.update({models.VGG: "vgg", models.VGGFlattenHead: "vgg"})
    kinds.update({models.GPT2: "gpt2", models.Llama: "llama"})
    return next((a for cls, a in kinds.items() if isinstance(model, cls)), None)


def _arch_of_paths(mapped: Mapping[str, np.ndarray]) -> str:
    marks = {
        "bert": "/backbone/embeddings/word_embeddings/",
        "vit": "/backbone/embeddings/patch_embed/",
        "resnet": "/backbone/layer1_0/",
        "vgg": "/backbone/conv1_1/",
        "gpt2": "/backbone/wte/",
        "llama": "/backbone/embed_tokens/",
    }
    for arch, mark in marks.items():
        if any(mark in p for p in mapped):
            return arch
    sample = next(iter(mapped), "(none)")
    raise WeightsError(
        f"cannot tell the architecture of these variables (e.g. {sample}); pass arch="
    )


def _write(
    dest: str,
    format: str,
    flat: Mapping[str, np.ndarray],
    dtype: np.dtype | None,
    max_bytes: int,
    overwrite: bool,
    *,
    config: Mapping[str, Any] | None = None,
    like: str | None = None,
) -> str:
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dest)}.tmp{os.getpid()}")
    try:
        if format == "hf":
            os.makedirs(tmp)
            writers.write_hf_safetensors(tmp, flat, max_bytes, dtype)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
            if like is not None:
                hf_folder.copy_folder_files(like, tmp)
        elif format == "orbax":
            tree = traverse_util.unflatten_dict(
                {k: writers.cast(v, dtype) for k, v in flat.items()}, sep="/"
            )
            save_checkpoint(tmp, tree)
        elif format == "keras":
            writers.write_keras_h5(tmp, flat, dtype)
        elif format == "npz":
            writers.write_npz(tmp, flat, dtype)
        elif dest.lower().endswith(".pth"):
            writers.write_torch(tmp, flat, dtype)
        else:
            meta = {"format": "jft" if format == "safetensors" else "pt"}
            writers.write_safetensors(tmp, flat, dtype, meta)
        if overwrite and os.path.lexists(dest):
            _remove(dest)
        os.replace(tmp, dest)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)
    return dest


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)
