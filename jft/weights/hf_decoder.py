"""``config.json`` of a decoder export (GPT-2 and the Llama family), the inverse of import.

:func:`jft.weights.from_pretrained` reads a Hugging Face config into a jft model
through the field tables and builders of :mod:`jft.weights._decoders`; this
module writes a model's fields back through the same tables. The family
(``model_type``) is the source folder's when there is one, else the one the
model's switches name (Gemma 2's sandwich norms, Gemma's ``1 + w`` norms, Qwen3's
q/k norms, Qwen2's q/k/v biases, Mistral's sliding window, else Llama). Each
family's config says only what its ``transformers`` class reads, and the config
written is read back by the import's builder: a model it does not rebuild field
for field is refused in one line rather than exported as a different model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from jft.models._decoder import layer_types
from jft.weights._decoders import DECODER_BUILDERS, GPT2_FIELDS, LLAMA_FIELDS
from jft.weights.restore import WeightsError

__all__ = ["CLASSES", "decoder_config", "family_of"]

CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
"""``model_type`` -> the ``transformers`` class of its ``architectures``."""

# Fields of LLAMA_FIELDS that only some families' transformers configs read.
_ONLY = {
    "hidden_activation": ("gemma", "gemma2"),
    "mlp_bias": ("llama",),
    "query_pre_attn_scalar": ("gemma2",),
    "attn_logit_softcapping": ("gemma2",),
    "final_logit_softcapping": ("gemma2",),
}
_ATTENTION_BIAS = ("llama", "qwen3", "gemma", "gemma2")  # q/k/v/o biases, one switch
_LAYER_TYPES = ("qwen2", "qwen3", "gemma2")  # a per-layer list of full/sliding attention
# Not part of the function a config describes: compute dtypes, rematerialization.
_IGNORED = {"dtype", "param_dtype", "remat", "parent", "name"}


def family_of(model: nn.Module) -> str:
    """The ``model_type`` whose switches ``model`` has (``gpt2`` for :class:`GPT2`)."""
    if not hasattr(model, "rms_norm_eps"):
        return "gpt2"
    if model.sandwich_norm or model.attn_logit_softcapping or model.final_logit_softcapping:
        return "gemma2"
    if model.norm_plus_one:
        return "gemma"
    if model.qk_norm:
        return "qwen3"
    if model.qkv_bias and not model.o_bias:
        return "qwen2"
    if model.sliding_window is not None and model.layer_types is None:
        return "mistral"
    return "llama"


def decoder_config(
    arch: str, model: nn.Module | None, config: Mapping[str, Any], source: str | None
) -> dict[str, Any]:
    """``config`` (the source folder's, maybe empty) with ``model``'s fields for ``arch``.

    Raises:
      WeightsError: no config and no model, a source config of another family,
        or a model its family's config cannot describe.
    """
    config = dict(config)
    family = config.get("model_type")
    if family is not None and family not in CLASSES:
        raise WeightsError(f"{source}: model_type {family!r} is not a decoder jft exports")
    if family is not None and (family == "gpt2") != (arch == "gpt2"):
        raise WeightsError(f"{source}: model_type {family!r} is not the exported {arch}")
    if model is None:
        if family is None:
            raise WeightsError(
                f"an hf export of {arch} needs its config.json: give the Hugging Face folder "
                "it came from (like=, --like FOLDER) or the model (model=)"
            )
    else:
        family = family or family_of(model)
        for key in ("rope_scaling", "rope_theta"):  # rope_parameters says it
            config.pop(key, None)
        config.update(_gpt2_fields(model) if family == "gpt2" else _llama_fields(family, model))
        config["model_type"] = family
        _check_rebuilds(family, config, model)
    config["model_type"] = family
    config["architectures"] = [CLASSES[family]]
    return config


def _gpt2_fields(model: nn.Module) -> dict[str, Any]:
    return {hf: getattr(model, ours) for hf, ours in GPT2_FIELDS.items()}


def _llama_fields(family: str, model: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {
        hf: getattr(model, ours)
        for hf, ours in LLAMA_FIELDS.items()
        if family in _ONLY.get(hf, (family,))
    }
    layers, kv_heads, head_dim = model.cache_spec()
    out.update(num_key_value_heads=kv_heads, head_dim=head_dim)
    if family == "gemma2" and model.query_pre_attn_scalar is None:
        out["query_pre_attn_scalar"] = head_dim  # jft's default scale; transformers' is 256
    if family in _ATTENTION_BIAS:
        out["attention_bias"] = bool(model.o_bias)
    rope: dict[str, Any] = {"rope_type": model.rope_type, "rope_theta": float(model.rope_theta)}
    if model.rope_type != "default":
        rope["factor"] = float(model.rope_factor)
    if model.rope_type == "llama3":
        rope.update(
            low_freq_factor=float(model.rope_low_freq_factor),
            high_freq_factor=float(model.rope_high_freq_factor),
            original_max_position_embeddings=int(model.rope_original_max_position),
        )
    out["rope_parameters"] = rope
    # The keys older readers (transformers 4, vLLM, llama.cpp's converter) take;
    # transformers 5 folds them into the same rope_parameters.
    out["rope_theta"] = rope["rope_theta"]
    if model.rope_type != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    types = _layer_types(model)
    sliding = "sliding_attention" in types
    window = model.sliding_window if sliding else None
    if family in _LAYER_TYPES:
        out.update(layer_types=list(types), sliding_window=window)
        if family != "gemma2":
            out["use_sliding_window"] = sliding
    elif family == "mistral":
        out["sliding_window"] = window
    return out


def _layer_types(model: nn.Module) -> tuple[str, ...]:
    return layer_types(model.layer_types, model.num_layers, model.sliding_window)


def _effective(model: nn.Module) -> dict[str, Any]:
    """The fields that decide what ``model`` computes, defaults resolved."""
    fields = {
        f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in _IGNORED
    }
    if "rms_norm_eps" not in fields:  # GPT-2
        fields["intermediate_size"] = model.intermediate_size or 4 * model.hidden_size
        return fields
    _, fields["num_kv_heads"], fields["head_dim"] = model.cache_spec()
    types = _layer_types(model)
    fields["layer_types"] = types
    if "sliding_attention" not in types:
        fields["sliding_window"] = None
    if fields["query_pre_attn_scalar"] is None:
        fields["query_pre_attn_scalar"] = fields["head_dim"]
    if model.rope_type == "default":
        fields["rope_factor"] = None
    if model.rope_type != "llama3":
        for key in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position"):
            fields[key] = None
    return fields


def _check_rebuilds(family: str, config: Mapping[str, Any], model: nn.Module) -> None:
    """The import's builder, given ``config``, must make ``model`` again (field for field)."""
    try:
        built, _, _ = DECODER_BUILDERS[family](dict(config), "(export)", 0, model.dtype, {})
    except WeightsError as e:
        raise WeightsError(f"a {family} config.json cannot describe this model: {e}") from None
    want, got = _effective(model), _effective(built)
    for key, value in want.items():
        if got.get(key) != value:
            raise WeightsError(
                f"a {family} config.json cannot say {key}={value!r} (transformers would build "
                f"{key}={got.get(key)!r}); export with --format safetensors to keep jft's model"
            )
