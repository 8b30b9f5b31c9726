"""Key map ``bert``: Hugging Face BERT names <-> :class:`jft.models.bert.Bert` paths.

Accepts ``BertModel`` names (``embeddings.word_embeddings.weight``,
``encoder.layer.0.attention.self.query.weight``, ``pooler.dense.weight``), as
sentence-transformers folders store them, and ``BertFor*`` names, which add a
prefix (``bert.``) and a top-level ``classifier`` (mapped to ``head/``). Old
TF-converted checkpoints that name LayerNorm parameters ``gamma``/``beta`` work too.

Export (layout ``"hf"``) writes ``BertModel`` names, or, when the variables hold a
``head/``, ``BertForSequenceClassification`` names (``bert.`` prefix, ``classifier``).
"""

from __future__ import annotations

from jft.weights.keymaps._hf import find_prefix, hf_keymap
from jft.weights.keymaps._table import EMBED, LINEAR, NORM, Rule

__all__ = ["HEAD_PREFIX", "RULES", "convert", "export", "find_prefix"]

_ANCHOR = "embeddings.word_embeddings.weight"
_LAYER = "encoder.layer.{i}"
_JFT_LAYER = "backbone/encoder/layer_{i}"
RULES = (
    Rule("embeddings.word_embeddings", "backbone/embeddings/word_embeddings", EMBED),
    Rule("embeddings.position_embeddings", "backbone/embeddings/position_embeddings", EMBED),
    Rule("embeddings.token_type_embeddings", "backbone/embeddings/token_type_embeddings", EMBED),
    Rule("embeddings.LayerNorm", "backbone/embeddings/layer_norm", NORM),
    Rule(f"{_LAYER}.attention.self.query", f"{_JFT_LAYER}/attention/query", LINEAR),
    Rule(f"{_LAYER}.attention.self.key", f"{_JFT_LAYER}/attention/key", LINEAR),
    Rule(f"{_LAYER}.attention.self.value", f"{_JFT_LAYER}/attention/value", LINEAR),
    Rule(f"{_LAYER}.attention.output.dense", f"{_JFT_LAYER}/attention/output", LINEAR),
    Rule(f"{_LAYER}.attention.output.LayerNorm", f"{_JFT_LAYER}/attention_layer_norm", NORM),
    Rule(f"{_LAYER}.intermediate.dense", f"{_JFT_LAYER}/intermediate", LINEAR),
    Rule(f"{_LAYER}.output.dense", f"{_JFT_LAYER}/output", LINEAR),
    Rule(f"{_LAYER}.output.LayerNorm", f"{_JFT_LAYER}/output_layer_norm", NORM),
    Rule("pooler.dense", "backbone/pooler", LINEAR),
    Rule("classifier", "head", LINEAR, top=True),  # BertForSequenceClassification's head
)
HEAD_PREFIX = "bert."  # the BertFor* classes keep the encoder under this prefix


convert, export = hf_keymap("bert", RULES, _ANCHOR, HEAD_PREFIX, head_only=True)
