"""The Llama decoder family: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma, Gemma 2.

One module, :class:`Llama`, with switches for what the families change:
grouped-query attention (``num_kv_heads``), RoPE with Llama 3 or linear scaling,
q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3), Gemma's ``1 + w`` RMSNorm,
``sqrt(hidden)`` embedding scaling and gelu-tanh MLP, sliding-window layers
(Mistral; alternating local/global in Gemma 2), Gemma 2's sandwich norms and
logit soft-capping, tied or untied embeddings. Each family's registered name
(``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma``, ``gemma2``) sets them.

Parameter paths (Hugging Face's module names, so the key map is one-to-one)::

    backbone/embed_tokens/embedding
    backbone/layers_{i}/input_layernorm/scale
    backbone/layers_{i}/attention/{q,k,v,o}_proj/{kernel,bias}   (bias: qkv_bias / o_bias)
    backbone/layers_{i}/attention/{q,k}_norm/scale                (qk_norm, Qwen3)
    backbone/layers_{i}/post_attention_layernorm/scale
    backbone/layers_{i}/{pre,post}_feedforward_layernorm/scale    (sandwich_norm, Gemma 2)
    backbone/layers_{i}/mlp/{gate,up,down}_proj/kernel
    backbone/norm/scale
    lm_head/kernel                                                (untied embeddings only)

As in Hugging Face, ``post_attention_layernorm`` is the norm before the MLP in
Llama and the norm of the attention output in Gemma 2.

Call ``model.apply(variables, input_ids, attention_mask, position_ids)``: logits
``(B, T, vocab)`` in float32. Position ids default to ``cumsum(mask) - 1`` (so
left padding works without them). With ``cache=`` (from :meth:`Llama.init_cache`)
and ``cache_index=`` it returns ``(logits, new_cache)``: see
:mod:`jft.models.generate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jft.models import layers
from jft.models._decoder import (
    LAYER_TYPES,
    DecoderConfigError,
    DecoderTrunk,
    LanguageModel,
    RMSNorm,
    apply_rope,
    attend,
    cached_kv,
    layer_types,
    no_head,
    remat_block,
    rope_frequencies,
    rope_tables,
    slot_bias,
    slots_and_mask,
)
from jft.models.layers import activation, fields_for
from jft.models.registry import register

__all__ = [
    "LAYER_TYPES",
    "Llama",
    "LlamaAttention",
    "LlamaBackbone",
    "LlamaBlock",
    "Mlp",
    "gemma",
    "gemma2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
]

Dtype = Any


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE, optional biases, q/k norm and a KV cache."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    rms_norm_eps: float = 1e-6
    norm_plus_one: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    attention_dropout: float = 0.0
    train: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, bias, cache, cache_index):
        """``x`` ``(B, T, D)`` -> ``((B, T, D), new layer cache or None)``."""
        b, t, d = x.shape
        init = nn.initializers.normal(0.02)

        def dense(n: int, use_bias: bool, name: str) -> nn.Dense:
            return layers.dense(
                n,
                use_bias=use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=init,
                name=name,
            )

        hd = self.head_dim
        q = dense(self.num_heads * hd, self.qkv_bias, "q_proj")(x).reshape(b, t, -1, hd)
        k = dense(self.num_kv_heads * hd, self.qkv_bias, "k_proj")(x).reshape(b, t, -1, hd)
        v = dense(self.num_kv_heads * hd, self.qkv_bias, "v_proj")(x).reshape(b, t, -1, hd)
        if self.qk_norm:
            norm = lambda name: RMSNorm(
                self.rms_norm_eps, self.norm_plus_one, self.param_dtype, name=name
            )
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v, new_cache = cached_kv(cache, k, v, cache_index)
        scale = (hd if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar) ** -0.5
        y = attend(q, k, v, bias, scale, self.attn_logit_softcapping)
        y = nn.Dropout(self.attention_dropout)(y, deterministic=not self.train)
        return dense(d, self.o_bias, "o_proj")(y), new_cache


class LlamaBlock(LlamaAttention):
    """One pre-norm decoder block (Gemma 2: sandwich norms around attention and MLP).

    It has :class:`LlamaAttention`'s fields, which it passes on, and the MLP's.
    """

    intermediate_size: int = 11008
    hidden_act: str = "silu"
    mlp_bias: bool = False
    sandwich_norm: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, bias, cache, cache_index):  # type: ignore[override]
        """``(B, T, D)`` -> ``((B, T, D), new layer cache or None)``."""

        def norm(name: str) -> RMSNorm:
            return RMSNorm(self.rms_norm_eps, self.norm_plus_one, self.param_dtype, name=name)

        y, new_cache = LlamaAttention(**fields_for(LlamaAttention, self), name="attention")(
            norm("input_layernorm")(x), cos, sin, bias, cache, cache_index
        )
        if self.sandwich_norm:
            x = x + norm("post_attention_layernorm")(y)
            h = norm("pre_feedforward_layernorm")(x)
        else:
            x = x + y
            h = norm("post_attention_layernorm")(x)
        h = Mlp(
            self.intermediate_size,
            self.hidden_act,
            self.mlp_bias,
            self.dtype,
            self.param_dtype,
            name="mlp",
        )(h)
        if self.sandwich_norm:
            h = norm("post_feedforward_layernorm")(h)
        return x + h, new_cache


class Mlp(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``."""

    intermediate_size: int
    hidden_act: str = "silu"
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``(..., D)`` -> ``(..., D)``."""

        def dense(n: int, name: str) -> nn.Dense:
            return layers.dense(
                n,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.initializers.normal(0.02),
                name=name,
            )

        gate = activation(self.hidden_act)(dense(self.intermediate_size, "gate_proj")(x))
        up = dense(self.intermediate_size, "up_proj")(x)
        return dense(x.shape[-1], "down_proj")(gate * up)


class LlamaBackbone(DecoderTrunk):
    """A Llama-family decoder trunk; the attributes are Hugging Face config fields.

    Embeddings, blocks ``layers_{i}`` and the final norm; :class:`Llama` adds the
    LM head. Returns ``(hidden (B, T, D), new cache or None, embedding matrix)``.

    Attributes:
      num_kv_heads: key/value heads (grouped-query attention); None: ``num_heads``.
      head_dim: None: ``hidden_size // num_heads``.
      rope_type: ``"default"``, ``"linear"`` or ``"llama3"`` with ``rope_factor``,
        ``rope_low_freq_factor``, ``rope_high_freq_factor``,
        ``rope_original_max_position`` (Llama 3.1's ``rope_scaling``).
      qkv_bias, o_bias, mlp_bias: biases of q/k/v (Qwen2), of o_proj, of the MLP.
      qk_norm: RMSNorm over each head's q and k before RoPE (Qwen3).
      norm_plus_one: Gemma's RMSNorm ``x * (1 + w)``, weights initialized at 0.
      embed_scale: multiply the embeddings by ``sqrt(hidden_size)`` (Gemma).
      sliding_window: window of the ``"sliding_attention"`` layers.
      layer_types: per layer, ``"full_attention"`` or ``"sliding_attention"``;
        None: all sliding when ``sliding_window`` is set (Mistral), else all full.
      sandwich_norm: Gemma 2's extra norms after attention and around the MLP.
      query_pre_attn_scalar: attention scale ``1/sqrt(this)`` (Gemma 2); None:
        ``1/sqrt(head_dim)``.
      attn_logit_softcapping, final_logit_softcapping: Gemma 2's ``tanh`` caps.
      tie_word_embeddings: the LM head is the embedding matrix (no ``lm_head/``).
      remat: per-block rematerialization policy, ``"full"``, ``"dots"``,
        ``"dots_no_batch"`` or None (see :data:`jft.models._decoder.REMAT_POLICIES`).
      dtype: compute dtype; ``param_dtype``: parameter dtype (bf16 halves memory).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 11008
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_plus_one: bool = False
    embed_scale: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    sandwich_norm: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    remat: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def cache_spec(self) -> tuple[int, int, int]:
        """``(num_layers, kv_heads, head_dim)`` of this model's KV cache."""
        kv = self.num_kv_heads or self.num_heads
        return self.num_layers, kv, self.head_dim or self.hidden_size // self.num_heads

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, cache, cache_index, train):
        """See :class:`Llama`; returns ``(hidden, new cache or None, embedding matrix)``."""
        _, kv_heads, head_dim = self.cache_spec()
        if self.num_heads % kv_heads:
            raise DecoderConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={kv_heads}"
            )
        q_slots, kv_mask, position_ids = slots_and_mask(
            input_ids, attention_mask, position_ids, cache, cache_index
        )
        biases = {
            "full_attention": slot_bias(kv_mask, q_slots),
            "sliding_attention": slot_bias(kv_mask, q_slots, self.sliding_window),
        }
        inv = rope_frequencies(
            head_dim,
            self.rope_theta,
            self.rope_type,
            self.rope_factor,
            self.rope_low_freq_factor,
            self.rope_high_freq_factor,
            self.rope_original_max_position,
        )
        cos, sin = rope_tables(position_ids, inv, self.dtype)

        embed = nn.Embed(
            self.vocab_size,
            self.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
            name="embed_tokens",
        )
        x = embed(input_ids)
        if self.embed_scale:
            x = x * jnp.asarray(self.hidden_size**0.5, x.dtype)
        block = remat_block(LlamaBlock, self.remat)
        fields = fields_for(LlamaBlock, self, num_kv_heads=kv_heads, head_dim=head_dim, train=train)
        new_cache = []
        types = layer_types(self.layer_types, self.num_layers, self.sliding_window)
        for i, kind in enumerate(types):
            x, layer_cache = block(**fields, name=f"layers_{i}")(
                x, cos, sin, biases[kind], None if cache is None else cache[i], cache_index
            )
            new_cache.append(layer_cache)
        x = RMSNorm(self.rms_norm_eps, self.norm_plus_one, self.param_dtype, name="norm")(x)
        return x, (None if cache is None else tuple(new_cache)), embed.embedding


class Llama(LanguageModel, LlamaBackbone):
    """A Llama-family causal language model: :class:`LlamaBackbone` and an LM head.

    Call ``model.apply(variables, input_ids, attention_mask=None, position_ids=None)``
    for logits ``(B, T, vocab)`` float32 (``attention_mask`` 1 = token, 0 =
    padding; position ids default to ``cumsum(mask) - 1``). With ``cache=``
    (:meth:`init_cache`) and ``cache_index=`` the mask covers the cache's slots and
    the call returns ``(logits, new_cache)`` (see :mod:`jft.models.generate`).
    ``train=True`` turns on attention dropout (rng ``"dropout"``).
    """

    backbone_class = LlamaBackbone

    def cap_logits(self, logits: jax.Array) -> jax.Array:
        """Gemma 2's ``tanh`` soft cap of the final logits (``final_logit_softcapping``)."""
        cap = self.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap


def _family(name: str, doc: str, **defaults: Any) -> Callable[..., Llama]:
    """Registers ``name``: a :class:`Llama` with ``defaults`` under the caller's ``kwargs``."""

    def build(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> Llama:
        no_head(num_classes)
        kwargs = {**defaults, **kwargs}
        if kwargs.get("layer_types") is not None:  # hashable, so the model can be a static arg
            kwargs["layer_types"] = tuple(kwargs["layer_types"])
        return Llama(dtype=dtype, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    return register(name)(build)


_GEMMA = dict(
    norm_plus_one=True, embed_scale=True, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True
)
llama = _family(
    "llama", "A Llama 2/3 decoder; ``kwargs`` are :class:`Llama` fields (defaults: Llama 2 7B)."
)
mistral = _family(
    "mistral",
    "Mistral: a Llama with grouped-query attention and a sliding window on every layer.",
    sliding_window=4096,
    num_kv_heads=8,
    intermediate_size=14336,
)
qwen2 = _family("qwen2", "Qwen2/2.5: a Llama with q/k/v biases.", qkv_bias=True, rope_theta=1e6)
qwen3 = _family("qwen3", "Qwen3: a Llama with per-head q/k RMSNorm.", qk_norm=True, rope_theta=1e6)
gemma = _family(
    "gemma",
    "Gemma: ``1 + w`` RMSNorm, ``sqrt(hidden)`` embedding scale, gelu-tanh MLP, tied head.",
    **_GEMMA,
)
gemma2 = _family(
    "gemma2",
    """Gemma 2: Gemma with sandwich norms, soft-capped logits and local/global layers.

    Pass ``layer_types`` (Hugging Face's: sliding on even layers) with ``num_layers``.
    """,
    **_GEMMA,
    sandwich_norm=True,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    sliding_window=4096,
)
