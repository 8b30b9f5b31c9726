"""Hugging Face ``config.json`` -> jft decoder models (GPT-2 and the Llama family).

The builders of :func:`jft.weights.from_pretrained` for ``model_type`` ``gpt2``,
``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma`` and ``gemma2``. A config
option that would change the model's function and that jft does not implement
is refused in one line naming it, rather than loaded into a different model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jft.models._decoder import ROPE_TYPES
from jft.models.gpt2 import GPT2
from jft.models.llama import LAYER_TYPES, Llama
from jft.weights.restore import WeightsError

Dtype = Any


# Hugging Face config field -> jft model field; export (jft.weights.hf_decoder) reads them back.
GPT2_FIELDS = {
    "vocab_size": "vocab_size",
    "n_positions": "n_positions",
    "n_embd": "hidden_size",
    "n_layer": "num_layers",
    "n_head": "num_heads",
    "n_inner": "intermediate_size",
    "activation_function": "activation_function",
    "layer_norm_epsilon": "layer_norm_eps",
    "embd_pdrop": "embd_dropout",
    "resid_pdrop": "resid_dropout",
    "attn_pdrop": "attn_dropout",
    "tie_word_embeddings": "tie_word_embeddings",
}
LLAMA_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "hidden_act": "hidden_act",
    "hidden_activation": "hidden_act",  # Gemma 2's name wins when both are set
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
    "attention_dropout": "attention_dropout",
    "mlp_bias": "mlp_bias",
    "query_pre_attn_scalar": "query_pre_attn_scalar",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
}


def _fail(folder: str, problem: str) -> WeightsError:
    return WeightsError(f"{os.path.join(folder, 'config.json')}: {problem}")


def _pick(config: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The HF fields in ``names`` (HF name -> jft field) that ``config`` sets (not None)."""
    return {ours: config[hf] for hf, ours in names.items() if config.get(hf) is not None}


def _no_head(folder: str, num_classes: int) -> None:
    if num_classes:
        raise _fail(
            folder,
            f"num_classes={num_classes}: a causal language model has no classifier head "
            "(its lm_head predicts tokens); use num_classes=0",
        )


def build_gpt2(config, folder, num_classes, dtype, overrides):
    """``model_type`` ``gpt2`` -> :class:`jft.models.gpt2.GPT2` (arch ``gpt2``)."""
    _no_head(folder, num_classes)
    for key, ok in (
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
        ("scale_attn_weights", True),
    ):
        if config.get(key, ok) != ok:
            raise _fail(folder, f"{key}={config[key]!r} is not supported (jft's GPT-2 has {ok})")
    kwargs = _pick(config, GPT2_FIELDS)
    model = GPT2(dtype=dtype, **{**kwargs, **overrides})
    return model, "gpt2", (jnp.zeros((1, 8), jnp.int32),)


def _rope(config: Mapping[str, Any], folder: str) -> dict[str, Any]:
    """RoPE fields from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise _fail(
            folder,
            f"rope type {rope_type!r} is not supported; jft's RoPE is one of "
            f"{', '.join(ROPE_TYPES)}",
        )
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type != "default":
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        out["rope_original_max_position"] = int(params["original_max_position_embeddings"])
    return out


def _layer_types(model_type: str, config: Mapping[str, Any], folder: str) -> dict[str, Any]:
    """``sliding_window`` and ``layer_types`` as each family's ``transformers`` code reads them."""
    n = config.get("num_hidden_layers", 32)
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if model_type in ("llama", "gemma"):
        return {}
    if model_type == "mistral":
        return {"sliding_window": window} if window is not None else {}
    if types is None and model_type == "gemma2":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if types is None and model_type in ("qwen2", "qwen3"):
        sliding = config.get("use_sliding_window", False)
        first = config.get("max_window_layers", n)
        types = [
            "sliding_attention" if sliding and i >= first else "full_attention" for i in range(n)
        ]
    bad = sorted(set(types or ()) - set(LAYER_TYPES))
    if bad:
        raise _fail(folder, f"layer_types {bad} are not supported (only {', '.join(LAYER_TYPES)})")
    if types and "sliding_attention" in types and window is None:
        raise _fail(folder, "layer_types has sliding_attention layers but sliding_window is null")
    out: dict[str, Any] = {"layer_types": tuple(types)} if types else {}
    if window is not None and types and "sliding_attention" in types:
        out["sliding_window"] = window
    return out


_FAMILY_SWITCHES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "gemma": {"norm_plus_one": True, "embed_scale": True, "tie_word_embeddings": True},
    "gemma2": {
        "norm_plus_one": True,
        "embed_scale": True,
        "tie_word_embeddings": True,
        "sandwich_norm": True,
    },
}


def build_llama(config, folder, num_classes, dtype, overrides):
    """``model_type`` llama/mistral/qwen2/qwen3/gemma/gemma2 -> :class:`Llama` (arch ``llama``)."""
    _no_head(folder, num_classes)
    model_type = config["model_type"]
    kwargs: dict[str, Any] = dict(_FAMILY_SWITCHES[model_type])
    kwargs.update(_pick(config, LLAMA_FIELDS))
    if config.get("attention_bias"):
        if model_type == "qwen2":
            raise _fail(folder, "attention_bias=true is not supported for qwen2 (q/k/v only)")
        kwargs.update(qkv_bias=True, o_bias=True)
    if model_type != "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(key) is not None:
                raise _fail(folder, f"{key} is not supported for model_type {model_type!r}")
    if config.get("pretraining_tp", 1) != 1:
        raise _fail(folder, f"pretraining_tp={config['pretraining_tp']} is not supported (1)")
    kwargs.update(_rope(config, folder))
    kwargs.update(_layer_types(model_type, config, folder))
    model = Llama(dtype=dtype, **{**kwargs, **overrides})
    return model, "llama", (jnp.zeros((1, 8), jnp.int32),)


DECODER_BUILDERS = {
    "gpt2": build_gpt2,
    **{family: build_llama for family in _FAMILY_SWITCHES},
}
