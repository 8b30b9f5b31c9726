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

from jft.weights import keymaps, writers
from jft.weights.convert import infer_arch, save_checkpoint
from jft.weights.readers import read
from jft.weights.restore import WeightsError

FORMATS = ("hf", "timm", "torchvision", "keras", "safetensors", "npz", "orbax")
"""``--format`` values: source layouts first, then jft's own names."""

_SUFFIXES = {
    "timm": (".safetensors", ".pth"),
    "torchvision": (".safetensors", ".pth"),
    "keras": (".h5",),
    "safetensors": (".safetensors",),
    "npz": (".npz",),
}
_HF_CLASSES = {  # arch -> (without head, with head)
    "bert": ("BertModel", "BertForSequenceClassification"),
    "vit": ("ViTModel", "ViTForImageClassification"),
    "resnet": ("ResNetModel", "ResNetForImageClassification"),
}
_HF_PREFIX = {"bert": "bert.", "vit": "vit.", "resnet": "resnet."}  # a *For* class's trunk
# Hugging Face config field -> jft model field (the inverse of from_pretrained's reading).
_HF_FIELDS = {
    "bert": {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "intermediate_size": "intermediate_size",
        "hidden_act": "hidden_act",
        "max_position_embeddings": "max_position_embeddings",
        "type_vocab_size": "type_vocab_size",
        "hidden_dropout_prob": "dropout_rate",
        "attention_probs_dropout_prob": "attention_dropout_rate",
        "classifier_dropout": "classifier_dropout",
        "layer_norm_eps": "layer_norm_eps",
    },
    "vit": {
        "image_size": "image_size",
        "patch_size": "patch_size",
        "hidden_size": "hidden_size",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "intermediate_size": "mlp_dim",
        "hidden_act": "hidden_act",
        "hidden_dropout_prob": "dropout_rate",
        "attention_probs_dropout_prob": "attention_dropout_rate",
        "layer_norm_eps": "layer_norm_eps",
        "qkv_bias": "qkv_bias",
    },
    "resnet": {
        "depths": "stage_sizes",
        "hidden_sizes": "widths",
        "layer_type": "block",
        "embedding_size": "stem_width",
    },
}
# Files of a Hugging Face folder that travel with the weights (never weights or config.json).
_CARRIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


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
      ``num_labels`` and ``id2label``. The config comes from ``like`` (a Hugging
      Face folder; ``src`` itself when it is one) and/or from ``model``; the
      tokenizer and sentence-transformers files of that folder are copied, and
      its tensors that jft does not model (a pooler, ``position_ids``) are
      carried over unchanged;
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
      arch: the key map (``bert``, ``vit``, ``resnet``, ``vgg``); default: from
        ``model``, else from the variable paths.
      model: the jft model the variables belong to (fills ``config.json``).
      like: a Hugging Face folder whose config, tokenizer and extra tensors to reuse.
      labels: class names of the head, in order (``id2label``); default ``LABEL_i``.
      dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"`` for floating tensors;
        None keeps each tensor's.
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
        config = _hf_config(arch, mapped, model, like, labels)
        if like is not None:
            flat = {**flat, **_carried_tensors(arch, flat, like, source_flat)}
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
    return next((a for cls, a in kinds.items() if isinstance(model, cls)), None)


def _arch_of_paths(mapped: Mapping[str, np.ndarray]) -> str:
    marks = {
        "bert": "/backbone/embeddings/word_embeddings/",
        "vit": "/backbone/embeddings/patch_embed/",
        "resnet": "/backbone/layer1_0/",
        "vgg": "/backbone/conv1_1/",
    }
    for arch, mark in marks.items():
        if any(mark in p for p in mapped):
            return arch
    sample = next(iter(mapped), "(none)")
    raise WeightsError(
        f"cannot tell the architecture of these variables (e.g. {sample}); pass arch="
    )


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not readable JSON ({' '.join(str(e).split())})") from None
    if not isinstance(out, dict):
        raise WeightsError(f"{path}: not a JSON object")
    return out


def _hf_config(
    arch: str,
    mapped: Mapping[str, np.ndarray],
    model: nn.Module | None,
    like: str | None,
    labels: Sequence[str] | None,
) -> dict[str, Any]:
    """``config.json`` for the export: ``like``'s, updated from ``model`` and the head."""
    config_path = os.path.join(like, "config.json") if like else None
    config = _read_json(config_path) if config_path and os.path.exists(config_path) else {}
    if config.get("model_type", arch) != arch:
        raise WeightsError(
            f"{config_path}: model_type {config['model_type']!r} is not the exported {arch}"
        )
    if model is not None:
        fields = _HF_FIELDS[arch].items()
        config.update({hf: _jsonable(getattr(model, ours)) for hf, ours in fields})
        if arch == "resnet":
            config["downsample_in_first_stage"] = model.first_stride == 2
            config["downsample_in_bottleneck"] = bool(model.stride_in_1x1)
            config["hidden_act"] = "relu"
    elif not config:
        raise WeightsError(
            f"an hf export of {arch} needs its config.json: give the Hugging Face folder it "
            "came from (like=, --like FOLDER) or the model (model=)"
        )
    config["model_type"] = arch
    config.pop("_name_or_path", None)
    head = mapped.get("params/head/kernel")
    num_labels = 0 if head is None else int(np.shape(head)[-1])
    config["architectures"] = [_HF_CLASSES[arch][bool(num_labels)]]
    if num_labels:
        if arch == "bert":
            pooling = getattr(model, "pooling", "pooler")
            if pooling != "pooler" or "params/backbone/pooler/kernel" not in mapped:
                raise WeightsError(
                    f"BertForSequenceClassification feeds its classifier the pooler, but this "
                    f"model pools {pooling!r}: train with pooling='pooler', or export the "
                    "encoder alone (drop params/head)"
                )
        old = config.get("id2label") or {}
        if labels is not None:
            names = list(labels)
        elif len(old) == num_labels:
            names = [old[str(i)] if str(i) in old else old[i] for i in range(num_labels)]
        else:
            names = [f"LABEL_{i}" for i in range(num_labels)]
        if len(names) != num_labels:
            raise WeightsError(f"labels: {len(names)} names for a head of {num_labels} classes")
        config["num_labels"] = num_labels
        config["id2label"] = {str(i): n for i, n in enumerate(names)}
        config["label2id"] = {n: i for i, n in enumerate(names)}
    return config


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _carried_tensors(
    arch: str, flat: Mapping[str, np.ndarray], like: str, source: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The tensors of ``like`` the export lacks (a pooler jft does not use, buffers).

    Only under the same prefix as the export, and never a ``classifier``: a
    ``BertModel`` file's pooler is not carried into a ``BertForSequenceClassification``
    export, nor a classifier into a model without a head.
    """
    if not source:
        source = read(like)
    prefix = _HF_PREFIX[arch]
    prefixed = any(k.startswith(prefix) for k in flat)
    return {
        k: v
        for k, v in source.items()
        if k not in flat and k.startswith(prefix) == prefixed and not k.startswith("classifier")
    }


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
                _copy_folder_files(like, tmp)
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


def _copy_folder_files(src: str, dst: str) -> None:
    """Copies the tokenizer and sentence-transformers files of ``src`` into ``dst``.

    Module folders named in ``modules.json`` (``1_Pooling``) are copied when they
    lie inside ``src``; nothing outside ``src`` is read.
    """
    root = os.path.realpath(src)
    for name in _CARRIED:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    modules = os.path.join(src, "modules.json")
    if not os.path.isfile(modules):
        return
    try:
        with open(modules) as f:
            entries = json.load(f)
        paths = [e.get("path", "") for e in entries if isinstance(e, dict)]
    except (OSError, ValueError, AttributeError):
        raise WeightsError(f"{modules}: not a sentence-transformers modules list") from None
    for rel in paths:
        full = os.path.realpath(os.path.join(src, str(rel)))
        if not rel or full == root or not full.startswith(root + os.sep):
            continue
        if os.path.isdir(full):
            shutil.copytree(full, os.path.join(dst, str(rel)))
