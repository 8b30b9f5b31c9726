"""Vision Transformer (Dosovitskiy et al., 2021), laid out as timm's ``vit_*`` / HF ``ViTModel``.

Parameter paths::

    backbone/embeddings/patch_embed/{kernel,bias}     conv, kernel = stride = patch
    backbone/embeddings/cls_token                     (1, 1, D)
    backbone/embeddings/pos_embed                     (1, 1 + gh * gw, D), cls part first
    backbone/encoder/layer_{i}/norm1/{scale,bias}
    backbone/encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}
    backbone/encoder/layer_{i}/norm2/{scale,bias}
    backbone/encoder/layer_{i}/mlp/{fc1,fc2}/{kernel,bias}
    backbone/ln_final/{scale,bias}
    head/{kernel,bias}                                (only with num_classes > 0)

Input NHWC float images. Output: logits ``(B, num_classes)``, or with
``num_classes=0`` the pooled features ``(B, D)`` (the final-normed class token,
timm's ``global_pool="token"``). ``model.apply(variables, x, method="encode")``
returns all final-normed tokens ``(B, 1 + N, D)`` (HF's ``last_hidden_state``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jft.models._transformer import Encoder, EncoderBlock
from jft.models.layers import activation, dense, fields_for
from jft.models.registry import register

__all__ = [
    "ViT",
    "ViTBackbone",
    "ViTEmbeddings",
    "ViTLayer",
    "ViTMlp",
    "resize_pos_embed",
    "resize_weights",
    "vit",
    "vit_b16",
    "vit_l16",
    "vit_s16",
    "vit_ti16",
]

Dtype = Any


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter ``a`` (PyTorch: -0.75; antialiased: -0.5)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _linear_kernel(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


def resize_weights(
    in_size: int, out_size: int, method: str = "bicubic", antialias: bool = True
) -> np.ndarray:
    """The ``(out_size, in_size)`` matrix of 1-D resampling, as ``torch.nn.functional.interpolate``.

    ``align_corners=False``. With ``antialias=True`` the kernel is widened by the
    scale when shrinking and renormalized at the borders (PIL's algorithm, which
    PyTorch's ``antialias=True`` follows, bicubic with a = -0.5); without it,
    PyTorch's plain bicubic (a = -0.75, border pixels repeated) or bilinear.
    """
    if method not in ("bicubic", "bilinear"):
        raise ValueError(f"unknown resize method {method!r}; use 'bicubic' or 'bilinear'")
    scale = in_size / out_size
    centers = (np.arange(out_size) + 0.5) * scale  # in input pixel units, pixel i spans [i, i+1)
    w = np.zeros((out_size, in_size))
    if antialias:
        support = max(scale, 1.0)
        x = (np.arange(in_size)[None, :] + 0.5 - centers[:, None]) / support
        w = _cubic(x, -0.5) if method == "bicubic" else _linear_kernel(x)
        return w / w.sum(axis=1, keepdims=True)
    src = centers - 0.5
    if method == "bilinear":
        src = np.maximum(src, 0.0)  # PyTorch clamps the linear source index, not the cubic one
        taps = (0, 1)
    else:
        taps = (-1, 0, 1, 2)
    x0 = np.floor(src)
    for tap in taps:
        idx = x0 + tap
        dist = src - idx
        k = _cubic(dist, -0.75) if method == "bicubic" else _linear_kernel(dist)
        np.add.at(w, (np.arange(out_size), np.clip(idx, 0, in_size - 1).astype(int)), k)
    return w


def resize_pos_embed(
    posemb: jax.Array | np.ndarray,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    method: str = "bicubic",
    antialias: bool = True,
) -> jax.Array:
    """Resamples the grid part of a ViT position embedding; the class-token part is kept.

    The defaults equal timm's ``resample_abs_pos_embed`` (bicubic, antialiased);
    ``antialias=False`` equals Hugging Face's ``interpolate_pos_encoding=True``.
    Runs in float32 and returns the input's dtype; works under ``jit`` (shapes are static).

    Args:
      posemb: ``(1, num_prefix_tokens + gh * gw, D)``.
      new_grid: ``(gh', gw')``, the patch grid of the new image size.
      old_grid: ``(gh, gw)``; None: square.
      num_prefix_tokens: leading tokens that are no grid position (the class token).
      method: ``"bicubic"`` or ``"bilinear"``.
      antialias: see :func:`resize_weights`.

    Returns:
      ``(1, num_prefix_tokens + gh' * gw', D)``.

    >>> resize_pos_embed(np.zeros((1, 1 + 4 * 4, 8)), (6, 6)).shape
    (1, 37, 8)
    """
    posemb = jnp.asarray(posemb)
    n = posemb.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"position embedding of {n} grid tokens is not square; give old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid {old_grid} does not hold the {n} grid tokens")
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    grid = grid.reshape(old_grid[0], old_grid[1], -1).astype(jnp.float32)
    wh = jnp.asarray(resize_weights(old_grid[0], new_grid[0], method, antialias), jnp.float32)
    ww = jnp.asarray(resize_weights(old_grid[1], new_grid[1], method, antialias), jnp.float32)
    grid = jnp.einsum("Hh,hwd,Ww->HWd", wh, grid, ww, precision=jax.lax.Precision.HIGHEST)
    grid = grid.reshape(1, new_grid[0] * new_grid[1], -1).astype(posemb.dtype)
    return jnp.concatenate([prefix, grid], axis=1)


class ViTEmbeddings(nn.Module):
    """Patch conv, class token and position embedding (resampled if the grid differs)."""

    hidden_size: int
    patch_size: int
    grid: tuple[int, int]
    dropout_rate: float = 0.0
    resize_antialias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """NHWC images -> ``(B, 1 + N, D)`` tokens."""
        p = self.patch_size
        x = nn.Conv(
            self.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=nn.initializers.lecun_normal(),
            name="patch_embed",
        )(x)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)  # row-major over (h, w), as timm's flatten(2)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
        pos = self.param(
            "pos_embed", nn.initializers.normal(0.02), (1, 1 + self.grid[0] * self.grid[1], d)
        )
        # Another input size: resample the position grid on the fly (timm's
        # dynamic_img_size, or HF's interpolate_pos_encoding without antialias).
        pos = resize_pos_embed(pos, (gh, gw), self.grid, antialias=self.resize_antialias)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
        x = x + pos.astype(x.dtype)
        return nn.Dropout(self.dropout_rate)(x, deterministic=not train)


class ViTLayer(EncoderBlock):
    """One pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    mlp_dim: int
    qkv_bias: bool

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """``(B, T, D)`` -> ``(B, T, D)``."""
        x = x + self.drop(self.attention(self.qkv_bias)(self.norm("norm1")(x), train=train), train)
        y = ViTMlp(self.mlp_dim, self.hidden_act, self.dropout_rate, self.dtype, name="mlp")(
            self.norm("norm2")(x), train=train
        )
        return x + self.drop(y, train)


class ViTMlp(nn.Module):
    """``fc2(dropout(act(fc1(x))))``."""

    mlp_dim: int
    hidden_act: str = "gelu"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """``(B, T, D)`` -> ``(B, T, D)``."""
        init = nn.initializers.truncated_normal(0.02)
        d = x.shape[-1]
        linear = functools.partial(dense, dtype=self.dtype, kernel_init=init)
        x = linear(self.mlp_dim, name="fc1")(x)
        x = nn.Dropout(self.dropout_rate)(activation(self.hidden_act)(x), deterministic=not train)
        return linear(d, name="fc2")(x)


class ViTBackbone(nn.Module):
    """Embeddings, encoder (``layer_{i}``) and final LayerNorm: ``backbone/`` of :class:`ViT`.

    NHWC images -> final-normed tokens ``(B, 1 + N, D)``. The attributes are :class:`ViT`'s.
    """

    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    hidden_act: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    resize_antialias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """NHWC images -> final-normed tokens ``(B, 1 + N, D)``."""
        size = self.image_size
        h, w = (size, size) if isinstance(size, int) else size
        x = ViTEmbeddings(
            self.hidden_size,
            self.patch_size,
            (h // self.patch_size, w // self.patch_size),
            self.dropout_rate,
            self.resize_antialias,
            self.dtype,
            name="embeddings",
        )(jnp.asarray(x, self.dtype), train=train)
        layer = functools.partial(ViTLayer, **fields_for(ViTLayer, self))
        x = Encoder(layer, self.num_layers, name="encoder")(x, train=train)
        return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="ln_final")(x)


class ViT(ViTBackbone):
    """A Vision Transformer classifier with the class-token head (timm ``global_pool="token"``).

    ``model.apply(variables, images, train=False)`` with NHWC float images returns
    logits ``(B, num_classes)``, or the pooled features ``(B, D)`` with
    ``num_classes=0``. Images of another size than ``image_size`` work: the
    position grid is resampled on the fly (see ``resize_antialias``); to change
    the stored grid once, see :func:`jft.weights.keymaps.vit.fit_pos_embed`.

    Attributes:
      num_classes: size of ``head/``; 0: no head.
      image_size: the image size the position embedding is stored for.
      layer_norm_eps: timm uses 1e-6, Hugging Face's ViTConfig 1e-12.
      qkv_bias: whether query/key/value have a bias (both timm and HF: yes).
      resize_antialias: how an input of another size resamples the position grid
        (bicubic): True as timm's ``dynamic_img_size``, False as Hugging Face's
        ``interpolate_pos_encoding=True``.
      dtype: compute dtype; parameters stay float32, the softmax runs in float32.
    """

    num_classes: int = 0

    def setup(self) -> None:
        self.backbone = ViTBackbone(**fields_for(ViTBackbone, self))
        if self.num_classes:
            # A new head starts at zero, as big_vision's fine-tuning heads (and timm's
            # "jax" init) do: the first logits are uniform, not random.
            self.head = nn.Dense(
                self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros
            )
        self.head_dropout = nn.Dropout(self.dropout_rate)

    def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
        """NHWC images -> all final-normed tokens ``(B, 1 + N, D)``, class token first."""
        return self.backbone(x, train=train)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # type: ignore[override]
        """NHWC images -> logits ``(B, num_classes)`` or features ``(B, D)``."""
        pooled = self.backbone(x, train=train)[:, 0]
        if not self.num_classes:
            return pooled
        return self.head(self.head_dropout(pooled, deterministic=not train))


@register("vit")
def vit(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> ViT:
    """A ViT; ``kwargs`` are :class:`ViT` fields (defaults: ViT-B/16 at 224)."""
    return ViT(num_classes=num_classes, dtype=dtype, **kwargs)


@register("vit_b16")
def vit_b16(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> ViT:
    """ViT-B/16 (timm ``vit_base_patch16_224``, HF ``google/vit-base-patch16-224``).

    >>> import jax, jax.numpy as jnp
    >>> model = vit_b16(num_classes=10, image_size=32, num_layers=1)
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> model.apply(model.init(jax.random.key(0), x), x).shape
    (2, 10)
    """
    return ViT(num_classes=num_classes, dtype=dtype, **kwargs)


@register("vit_s16")
def vit_s16(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> ViT:
    """ViT-S/16 (timm ``vit_small_patch16_224``): hidden 384, 12 layers, 6 heads."""
    cfg = dict(hidden_size=384, num_heads=6, mlp_dim=1536)
    return ViT(num_classes=num_classes, dtype=dtype, **{**cfg, **kwargs})


@register("vit_ti16")
def vit_ti16(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> ViT:
    """ViT-Ti/16 (timm ``vit_tiny_patch16_224``): hidden 192, 12 layers, 3 heads."""
    cfg = dict(hidden_size=192, num_heads=3, mlp_dim=768)
    return ViT(num_classes=num_classes, dtype=dtype, **{**cfg, **kwargs})


@register("vit_l16")
def vit_l16(num_classes: int = 0, dtype: Dtype = jnp.float32, **kwargs: Any) -> ViT:
    """ViT-L/16 (timm ``vit_large_patch16_224``): hidden 1024, 24 layers, 16 heads."""
    cfg = dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096)
    return ViT(num_classes=num_classes, dtype=dtype, **{**cfg, **kwargs})
