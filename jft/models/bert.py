"""BERT / MiniLM encoders (Devlin et al., 2019), laid out as Hugging Face's ``BertModel``.

Parameter paths::

    backbone/embeddings/{word,position,token_type}_embeddings/embedding
    backbone/embeddings/layer_norm/{scale,bias}
    backbone/encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}
    backbone/encoder/layer_{i}/attention_layer_norm/{scale,bias}
    backbone/encoder/layer_{i}/intermediate/{kernel,bias}
    backbone/encoder/layer_{i}/output/{kernel,bias}
    backbone/encoder/layer_{i}/output_layer_norm/{scale,bias}
    backbone/pooler/{kernel,bias}          (only with pooling="pooler")
    head/{kernel,bias}                     (only with num_classes > 0)

Output convention: with ``num_classes > 0`` the model returns logits
``(B, num_classes)``; with ``num_classes=0`` it returns a :class:`BertOutput`
holding ``last_hidden_state`` ``(B, T, H)`` and ``pooled`` ``(B, H)``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jft.models._transformer import Encoder, EncoderBlock, SelfAttention, attention_bias
from jft.models.layers import activation, dense, fields_for
from jft.models.registry import register

__all__ = [
    "Bert",
    "BertBackbone",
    "BertEmbeddings",
    "BertLayer",
    "BertOutput",
    "SelfAttention",
    "attention_bias",
    "bert",
    "bert_base",
    "bert_large",
    "get_activation",
    "mean_pool",
    "minilm_l12",
    "minilm_l6",
]

Dtype = Any
_POOLINGS = ("mean", "cls", "pooler")


@flax.struct.dataclass
class BertOutput:
    """What a BERT model without a head returns (a pytree, so it passes through ``jit``).

    Attributes:
      last_hidden_state: ``(B, T, H)``, the last encoder layer's output, in ``dtype``.
      pooled: ``(B, H)`` float32, the sequence embedding chosen by ``pooling``
        (by default the attention-mask-weighted mean, as sentence-transformers does).
    """

    last_hidden_state: jax.Array
    pooled: jax.Array


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of ``hidden`` ``(B, T, H)`` over the tokens where ``attention_mask`` is 1.

    Computed in float32; the count is clamped at 1e-9, as sentence-transformers does.
    """
    mask = attention_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
    return total / jnp.clip(jnp.sum(mask, axis=1), 1e-9)


# Hugging Face's ``hidden_act`` names are the keys of the one activation table.
get_activation = activation  # an alias of jft.models.layers.activation


class BertLayer(EncoderBlock):
    """One post-norm BERT block: attention, add & norm, feed-forward, add & norm."""

    intermediate_size: int

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, *, train: bool) -> jax.Array:
        """``x`` ``(B, T, H)`` -> ``(B, T, H)``; ``bias`` from :func:`attention_bias`."""
        init = nn.initializers.truncated_normal(0.02)
        y = self.attention()(x, bias, train=train)
        x = self.norm("attention_layer_norm")(x + self.drop(y, train))
        linear = functools.partial(dense, dtype=self.dtype, kernel_init=init)
        y = activation(self.hidden_act)(linear(self.intermediate_size, name="intermediate")(x))
        y = linear(x.shape[-1], name="output")(y)
        return self.norm("output_layer_norm")(x + self.drop(y, train))


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout (HF ``BertEmbeddings``)."""

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    type_vocab_size: int
    dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-12
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, *, train: bool) -> jax.Array:
        """Token ids ``(B, T)`` -> ``(B, T, H)``; positions are ``0..T-1``."""
        t = input_ids.shape[1]
        if t > self.max_position_embeddings:
            raise ValueError(
                f"sequence length {t} > max_position_embeddings={self.max_position_embeddings}"
            )

        def embed(n: int, name: str) -> nn.Embed:
            init = nn.initializers.truncated_normal(0.02)
            return nn.Embed(n, self.hidden_size, dtype=self.dtype, embedding_init=init, name=name)

        x = (
            embed(self.vocab_size, "word_embeddings")(input_ids)
            + embed(self.max_position_embeddings, "position_embeddings")(jnp.arange(t)[None])
            + embed(self.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=not train)


class BertBackbone(nn.Module):
    """Embeddings, encoder (``layer_{i}``) and pooling: the ``backbone/`` of :class:`Bert`.

    Returns ``(last_hidden_state (B, T, H), pooled (B, H) float32)``; HF's pooler
    (``backbone/pooler``) exists only with ``pooling="pooler"``. The attributes
    are :class:`Bert`'s.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-12
    pooling: str = "mean"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids, *, train: bool):
        """Ids, 1/0 mask and segment ids, all ``(B, T)``."""
        if self.pooling not in _POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; use one of {_POOLINGS}")
        x = BertEmbeddings(**fields_for(BertEmbeddings, self), name="embeddings")(
            input_ids, token_type_ids, train=train
        )
        layer = functools.partial(BertLayer, **fields_for(BertLayer, self))
        x = Encoder(layer, self.num_layers, name="encoder")(
            x, attention_bias(attention_mask), train=train
        )
        if self.pooling == "mean":
            return x, mean_pool(x, attention_mask)
        if self.pooling == "cls":
            return x, x[:, 0].astype(jnp.float32)
        init = nn.initializers.truncated_normal(0.02)
        pooler = nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=init, name="pooler")
        return x, jnp.tanh(pooler(x[:, 0])).astype(jnp.float32)


class Bert(BertBackbone):
    """A BERT-family encoder (BERT, MiniLM, sentence-transformers) with an optional head.

    Call ``model.apply(variables, input_ids=..., attention_mask=..., token_type_ids=...,
    train=False)``, all ``(B, T)`` integer arrays; ``attention_mask`` (1 = token, 0 =
    padding) defaults to all ones and ``token_type_ids`` to zeros. Returns logits
    ``(B, num_classes)`` when ``num_classes > 0``, else a :class:`BertOutput`.

    Attributes:
      num_classes: size of the classifier ``head/`` on the pooled embedding; 0: no head.
      pooling: how ``pooled`` is made: ``"mean"`` (attention-mask-weighted mean of the
        last hidden state, as sentence-transformers does), ``"cls"`` (the first token),
        or ``"pooler"`` (``tanh(Dense(first token))`` under ``backbone/pooler``, as
        Hugging Face's ``BertForSequenceClassification`` feeds its classifier).
      classifier_dropout: dropout before the head; None: ``dropout_rate``.
      dtype: compute dtype (bf16 on TPU); parameters stay float32, and the
        attention softmax and the pooling run in float32.
      The other attributes are Hugging Face's ``BertConfig`` fields.
    """

    num_classes: int = 0
    classifier_dropout: float | None = None

    @nn.compact
    def __call__(  # type: ignore[override]
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array | BertOutput:
        """Runs the encoder; see the class docstring for inputs and outputs."""
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        hidden, pooled = BertBackbone(**fields_for(BertBackbone, self), name="backbone")(
            input_ids, attention_mask, token_type_ids, train=train
        )
        if self.num_classes == 0:
            return BertOutput(last_hidden_state=hidden, pooled=pooled)
        rate = self.dropout_rate if self.classifier_dropout is None else self.classifier_dropout
        pooled = nn.Dropout(rate)(pooled.astype(self.dtype), deterministic=not train)
        return nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.truncated_normal(0.02),
            name="head",
        )(pooled)


def _bert(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> Bert:
    return Bert(num_classes=num_classes, dtype=dtype, **kwargs)


@register("bert")
def bert(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> Bert:
    """A BERT encoder; ``kwargs`` are :class:`Bert` fields (defaults: BERT-base)."""
    return _bert(num_classes, dtype, **kwargs)


@register("bert_base")
def bert_base(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> Bert:
    """BERT-base: 12 layers, hidden 768, 12 heads (``bert-base-uncased``)."""
    return _bert(num_classes, dtype, **kwargs)


@register("bert_large")
def bert_large(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> Bert:
    """BERT-large: 24 layers, hidden 1024, 16 heads."""
    cfg = dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
    return _bert(num_classes, dtype, **{**cfg, **kwargs})


@register("minilm_l6")
def minilm_l6(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> Bert:
    """MiniLM-L6-H384 (``all-MiniLM-L6-v2``): 6 layers, hidden 384, 12 heads, mean pooling.

    >>> import jax, jax.numpy as jnp
    >>> model = minilm_l6(num_layers=1)
    >>> ids = jnp.array([[101, 2023, 102, 0]])
    >>> out = model.apply(model.init(jax.random.key(0), ids), ids, jnp.array([[1, 1, 1, 0]]))
    >>> out.last_hidden_state.shape, out.pooled.shape
    ((1, 4, 384), (1, 384))
    """
    cfg = dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)
    return _bert(num_classes, dtype, **{**cfg, **kwargs})


@register("minilm_l12")
def minilm_l12(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> Bert:
    """MiniLM-L12-H384 (``all-MiniLM-L12-v2``): 12 layers, hidden 384, 12 heads."""
    cfg = dict(hidden_size=384, num_layers=12, num_heads=12, intermediate_size=1536)
    return _bert(num_classes, dtype, **{**cfg, **kwargs})
