"""The Hugging Face side of an export: ``config.json``, and what travels with the weights.

Used by :func:`jft.weights.export` for ``format="hf"``: the config comes from the
folder the model was imported from and/or the jft model's fields (the inverse of
:func:`jft.weights.from_pretrained`'s reading); the tokenizer and
sentence-transformers files of that folder are copied, and its tensors jft has
no variable for (a pooler it does not use, ``position_ids``) are carried over.
A decoder's config is :mod:`jft.weights.hf_decoder`'s.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np

from jft._json import read_object
from jft.weights import hf_decoder
from jft.weights.readers import read
from jft.weights.restore import WeightsError

__all__ = [
    "CARRIED",
    "HF_CLASSES",
    "HF_FIELDS",
    "HF_PREFIX",
    "carried_tensors",
    "copy_folder_files",
    "hf_config",
]

HF_CLASSES = {  # arch -> (without head, with head)
    "bert": ("BertModel", "BertForSequenceClassification"),
    "vit": ("ViTModel", "ViTForImageClassification"),
    "resnet": ("ResNetModel", "ResNetForImageClassification"),
}
HF_PREFIX = {"bert": "bert.", "vit": "vit.", "resnet": "resnet."}  # a *For* class's trunk
# Hugging Face config field -> jft model field (the inverse of from_pretrained's reading).
HF_FIELDS = {
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
CARRIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def hf_config(
    arch: str,
    mapped: Mapping[str, np.ndarray],
    model: nn.Module | None,
    like: str | None,
    labels: Sequence[str] | None,
) -> dict[str, Any]:
    """``config.json`` for the export: ``like``'s, updated from ``model`` and the head."""
    config_path = os.path.join(like, "config.json") if like else None
    config = (
        read_object(config_path, WeightsError)
        if config_path and os.path.exists(config_path)
        else {}
    )
    if arch in ("gpt2", "llama"):
        return hf_decoder.decoder_config(arch, model, config, config_path)
    if config.get("model_type", arch) != arch:
        raise WeightsError(
            f"{config_path}: model_type {config['model_type']!r} is not the exported {arch}"
        )
    if model is not None:
        fields = HF_FIELDS[arch].items()
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
    config["architectures"] = [HF_CLASSES[arch][bool(num_labels)]]
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


def carried_tensors(
    arch: str, flat: Mapping[str, np.ndarray], like: str, source: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The tensors of ``like`` the export lacks (a pooler jft does not use, buffers).

    Only under the same prefix as the export, and never a ``classifier``: a
    ``BertModel`` file's pooler is not carried into a ``BertForSequenceClassification``
    export, nor a classifier into a model without a head.
    """
    if not source:
        source = read(like)
    prefix = HF_PREFIX[arch]
    prefixed = any(k.startswith(prefix) for k in flat)
    return {
        k: v
        for k, v in source.items()
        if k not in flat and k.startswith(prefix) == prefixed and not k.startswith("classifier")
    }


def copy_folder_files(src: str, dst: str) -> None:
    """Copies the tokenizer and sentence-transformers files of ``src`` into ``dst``.

    Module folders named in ``modules.json`` (``1_Pooling``) are copied when they
    lie inside ``src``; nothing outside ``src`` is read.
    """
    root = os.path.realpath(src)
    for name in CARRIED:
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
