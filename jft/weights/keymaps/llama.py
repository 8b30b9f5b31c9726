"""Key map ``llama``: Hugging Face ``*ForCausalLM`` names <-> :class:`jft.models.llama.Llama` paths.

One table for the whole family (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2):
``model.embed_tokens``, ``model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
self_attn.{q,k}_norm, post_attention_layernorm, pre_feedforward_layernorm,
post_feedforward_layernorm, mlp.{gate,up,down}_proj}``, ``model.norm`` and a
top-level ``lm_head`` (absent from folders with tied embeddings). A family that
lacks a module simply has no such tensor. ``*Model`` files (no ``model.`` prefix)
load too.

Export (layout ``"hf"``) writes ``*ForCausalLM`` names from the same table.
"""

from __future__ import annotations

from jft.weights.keymaps._hf import hf_keymap
from jft.weights.keymaps._table import EMBED, LINEAR, NORM, Rule

__all__ = ["PREFIX", "RULES", "convert", "export"]

_ANCHOR = "embed_tokens.weight"
_L = "layers.{i}"
_J = "backbone/layers_{i}"
RULES = (
    Rule("embed_tokens", "backbone/embed_tokens", EMBED),
    Rule(f"{_L}.input_layernorm", f"{_J}/input_layernorm", NORM),
    Rule(f"{_L}.self_attn.q_proj", f"{_J}/attention/q_proj", LINEAR),
    Rule(f"{_L}.self_attn.k_proj", f"{_J}/attention/k_proj", LINEAR),
    Rule(f"{_L}.self_attn.v_proj", f"{_J}/attention/v_proj", LINEAR),
    Rule(f"{_L}.self_attn.o_proj", f"{_J}/attention/o_proj", LINEAR),
    Rule(f"{_L}.self_attn.q_norm", f"{_J}/attention/q_norm", NORM),
    Rule(f"{_L}.self_attn.k_norm", f"{_J}/attention/k_norm", NORM),
    Rule(f"{_L}.post_attention_layernorm", f"{_J}/post_attention_layernorm", NORM),
    Rule(f"{_L}.pre_feedforward_layernorm", f"{_J}/pre_feedforward_layernorm", NORM),
    Rule(f"{_L}.post_feedforward_layernorm", f"{_J}/post_feedforward_layernorm", NORM),
    Rule(f"{_L}.mlp.gate_proj", f"{_J}/mlp/gate_proj", LINEAR),
    Rule(f"{_L}.mlp.up_proj", f"{_J}/mlp/up_proj", LINEAR),
    Rule(f"{_L}.mlp.down_proj", f"{_J}/mlp/down_proj", LINEAR),
    Rule("norm", "backbone/norm", NORM),
    Rule("lm_head", "lm_head", LINEAR, top=True),
)
PREFIX = "model."  # *ForCausalLM keeps the decoder under this prefix


convert, export = hf_keymap("llama", RULES, _ANCHOR, PREFIX)
