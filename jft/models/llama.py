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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jft.models._decoder import (
    Cache,
    DecoderConfigError,
    RMSNorm,
    apply_rope,
    attend,
    init_cache,
    lm_logits,
    no_head,
    remat_block,
    rope_frequencies,
    slot_bias,
    slots_and_mask,
    write_cache,
)
from jft.models.layers import activation
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
LAYER_TYPES = ("full_attention", "sliding_attention")


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE, optional biases, q/k norm and a KV cache."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    norm_plus_one: bool = False
    scale: float | None = None
    softcap: float | None = None
    dropout_rate: float = 0.0
    train: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, bias, cache, cache_index):
        """``x`` ``(B, T, D)`` -> ``((B, T, D), new layer cache or None)``."""
        b, t, d = x.shape
        init = nn.initializers.normal(0.02)

        def dense(n: int, use_bias: bool, name: str) -> nn.Dense:
            return nn.Dense(
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
                self.norm_eps, self.norm_plus_one, self.param_dtype, name=name
            )
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        if cache is not None:
            new_cache = write_cache(cache, k, v, cache_index)
            k, v = new_cache["k"], new_cache["v"]
        scale = hd**-0.5 if self.scale is None else self.scale
        y = attend(q, k, v, bias, scale, self.softcap)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=not self.train)
        return dense(d, self.o_bias, "o_proj")(y), new_cache


class LlamaBlock(nn.Module):
    """One pre-norm decoder block (Gemma 2: sandwich norms around attention and MLP)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    norm_plus_one: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    scale: float | None = None
    softcap: float | None = None
    dropout_rate: float = 0.0
    train: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, bias, cache, cache_index):
        """``(B, T, D)`` -> ``((B, T, D), new layer cache or None)``."""

        def norm(name: str) -> RMSNorm:
            return RMSNorm(self.rms_norm_eps, self.norm_plus_one, self.param_dtype, name=name)

        y, new_cache = LlamaAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.qkv_bias,
            self.o_bias,
            self.qk_norm,
            self.rms_norm_eps,
            self.norm_plus_one,
            self.scale,
            self.softcap,
            self.dropout_rate,
            self.train,
            self.dtype,
            self.param_dtype,
            name="attention",
        )(norm("input_layernorm")(x), cos, sin, bias, cache, cache_index)
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
            return nn.Dense(
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


class LlamaBackbone(nn.Module):
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

    def init_cache(self, batch: int, length: int, dtype: Dtype | None = None) -> Cache:
        """An empty KV cache of ``length`` slots (``dtype`` default: the compute dtype)."""
        layers, kv_heads, head_dim = self.cache_spec()
        return init_cache(layers, batch, length, kv_heads, head_dim, dtype or self.dtype)

    def _layer_types(self) -> tuple[str, ...]:
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            bad = [t for t in types if t not in LAYER_TYPES]
            if bad or len(types) != self.num_layers:
                raise DecoderConfigError(
                    f"layer_types {list(types)} must list {self.num_layers} entries of "
                    f"{', '.join(LAYER_TYPES)}"
                )
            return types
        kind = "full_attention" if self.sliding_window is None else "sliding_attention"
        return (kind,) * self.num_layers

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
        angles = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv)
        angles = jnp.concatenate([angles, angles], axis=-1)
        cos, sin = jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype)

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
        scale = None
        if self.query_pre_attn_scalar is not None:
            scale = self.query_pre_attn_scalar**-0.5
        new_cache = []
        for i, kind in enumerate(self._layer_types()):
            x, layer_cache = block(
                self.num_heads,
                kv_heads,
                head_dim,
                self.intermediate_size,
                self.hidden_act,
                self.rms_norm_eps,
                self.norm_plus_one,
                self.qkv_bias,
                self.o_bias,
                self.mlp_bias,
                self.qk_norm,
                self.sandwich_norm,
                scale,
                self.attn_logit_softcapping,
                self.attention_dropout,
                train,
                self.dtype,
                self.param_dtype,
                name=f"layers_{i}",
            )(x, cos, sin, biases[kind], None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        x = RMSNorm(self.rms_norm_eps, self.norm_plus_one, self.param_dtype, name="norm")(x)
        return x, (None if cache is None else tuple(new_cache)), embed.embedding


class Llama(LlamaBackbone):
    """A Llama-family causal language model: :class:`LlamaBackbone` and an LM head.

    Call ``model.apply(variables, input_ids, attention_mask=None, position_ids=None)``
    for logits ``(B, T, vocab)`` float32 (``attention_mask`` 1 = token, 0 =
    padding; position ids default to ``cumsum(mask) - 1``). With ``cache=``
    (:meth:`init_cache`) and ``cache_index=`` the mask covers the cache's slots and
    the call returns ``(logits, new_cache)`` (see :mod:`jft.models.generate`).
    ``train=True`` turns on attention dropout (rng ``"dropout"``).
    """

    @nn.compact
    def __call__(  # type: ignore[override]
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
        train: bool = False,
    ) -> jax.Array | tuple[jax.Array, Cache]:
        """Logits ``(B, T, vocab)`` float32, and the new cache when ``cache`` is given."""
        logits, new_cache = lm_logits(
            self, LlamaBackbone, input_ids, attention_mask, position_ids, cache, cache_index, train
        )
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = jnp.tanh(logits / cap) * cap
        return logits if cache is None else (logits, new_cache)


def _family(defaults: dict[str, Any]):
    def build(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> Llama:
        no_head(num_classes)
        kwargs = {**defaults, **kwargs}
        if kwargs.get("layer_types") is not None:  # hashable, so the model can be a static arg
            kwargs["layer_types"] = tuple(kwargs["layer_types"])
        return Llama(dtype=dtype, **kwargs)

    return build


_FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 4096, "num_kv_heads": 8, "intermediate_size": 14336},
    "qwen2": {"qkv_bias": True, "rope_theta": 1000000.0},
    "qwen3": {"qk_norm": True, "rope_theta": 1000000.0},
    "gemma": {
        "norm_plus_one": True,
        "embed_scale": True,
        "hidden_act": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
    },
    "gemma2": {
        "norm_plus_one": True,
        "embed_scale": True,
        "hidden_act": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "sandwich_norm": True,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 4096,
    },
}


@register("llama")
def llama(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> Llama:
    """A Llama 2/3 decoder; ``kwargs`` are :class:`Llama` fields (defaults: Llama 2 7B)."""
    return _family(_FAMILIES["llama"])(num_classes, dtype, **kwargs)


@register("mistral")
def mistral(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> Llama:
    """Mistral: a Llama with grouped-query attention and a sliding window on every layer."""
    return _family(_FAMILIES["mistral"])(num_classes, dtype, **kwargs)


@register("qwen2")
def qwen2(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> Llama:
    """Qwen2/2.5: a Llama with q/k/v biases."""
    return _family(_FAMILIES["qwen2"])(num_classes, dtype, **kwargs)


@register("qwen3")
def qwen3(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> Llama:
    """Qwen3: a Llama with per-head q/k RMSNorm."""
    return _family(_FAMILIES["qwen3"])(num_classes, dtype, **kwargs)


@register("gemma")
def gemma(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> Llama:
    """Gemma: ``1 + w`` RMSNorm, ``sqrt(hidden)`` embedding scale, gelu-tanh MLP, tied head."""
    return _family(_FAMILIES["gemma"])(num_classes, dtype, **kwargs)


@register("gemma2")
def gemma2(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> Llama:
    """Gemma 2: Gemma with sandwich norms, soft-capped logits and local/global layers.

    Pass ``layer_types`` (Hugging Face's: sliding on even layers) with ``num_layers``.
    """
    return _family(_FAMILIES["gemma2"])(num_classes, dtype, **kwargs)
