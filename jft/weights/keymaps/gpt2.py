"""Key map ``gpt2``: Hugging Face GPT-2 names <-> :class:`jft.models.gpt2.GPT2` paths.

``GPT2LMHeadModel`` names (``transformer.wte``, ``transformer.h.N.attn.c_attn``...)
and ``GPT2Model`` names (no ``transformer.`` prefix). GPT-2's ``Conv1D`` weights
are stored ``(in, out)``, Flax's kernel layout, so no tensor is transposed. A
``lm_head.weight`` is loaded only into a model with untied embeddings. The
``attn.bias``/``attn.masked_bias`` buffers of old files (causal masks, not
parameters) are reported unused.

Export (layout ``"hf"``) writes ``GPT2LMHeadModel`` names from the same table.
"""

from __future__ import annotations

from jft.weights.keymaps._hf import hf_keymap
from jft.weights.keymaps._table import EMBED, LINEAR, NORM, Kind, Leaf, Rule

__all__ = ["CONV1D", "PREFIX", "RULES", "convert", "export"]

# GPT-2's Conv1D: weight (in, out) <-> kernel, bias <-> bias; no layout change.
CONV1D: Kind = (Leaf("weight", "kernel"), Leaf("bias", "bias"))
_ANCHOR = "wte.weight"
_L = "h.{i}"
_J = "backbone/layers_{i}"
RULES = (
    Rule("wte", "backbone/wte", EMBED),
    Rule("wpe", "backbone/wpe", EMBED),
    Rule(f"{_L}.ln_1", f"{_J}/ln_1", NORM),
    Rule(f"{_L}.attn.c_attn", f"{_J}/attn/c_attn", CONV1D),
    Rule(f"{_L}.attn.c_proj", f"{_J}/attn/c_proj", CONV1D),
    Rule(f"{_L}.ln_2", f"{_J}/ln_2", NORM),
    Rule(f"{_L}.mlp.c_fc", f"{_J}/mlp/c_fc", CONV1D),
    Rule(f"{_L}.mlp.c_proj", f"{_J}/mlp/c_proj", CONV1D),
    Rule("ln_f", "backbone/ln_f", NORM),
    Rule("lm_head", "lm_head", LINEAR, top=True),
)
PREFIX = "transformer."  # GPT2LMHeadModel keeps the decoder under this prefix


convert, export = hf_keymap("gpt2", RULES, _ANCHOR, PREFIX)
