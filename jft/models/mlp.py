"""A multilayer perceptron classifier: ``backbone/dense_{i}`` and ``head``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jft.models import layers
from jft.models.registry import register

__all__ = ["MLP", "mlp"]

Dtype = Any


class MLP(nn.Module):
    """Dense layers on the flattened input, then a ``head``.

    ``model.apply(variables, x, train=False)`` flattens ``x`` to ``(B, -1)`` and
    returns ``(B, num_classes)``, or the last hidden layer when ``num_classes=0``.

    Attributes:
      widths: hidden layer sizes, e.g. ``(128,)`` or ``(64, 64)``; may be empty.
      num_classes: output size; 0 for no head.
      activation: hidden activation, a name of
        :data:`jft.models.layers.ACTIVATIONS` (``"relu"``, ``"gelu"`` the exact
        erf GELU, ``"gelu_new"`` its tanh approximation, ``"tanh"``...) or a
        function.
      output_activation: ``None`` (logits, the default), ``"softmax"`` or
        ``"sigmoid"``. Losses such as ``optax.softmax_cross_entropy`` and
        ``optax.sigmoid_binary_cross_entropy`` take logits: keep ``None`` to train
        and use an output activation only for a model that must return
        probabilities.
      dropout_rate: dropout after each hidden layer in train mode (rng ``"dropout"``).
      dtype: compute dtype (parameters stay float32).
    """

    widths: Sequence[int] = (128,)
    num_classes: int = 10
    activation: str | Callable[[jax.Array], jax.Array] = "relu"
    output_activation: str | None = None
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        if self.output_activation not in (None, "softmax", "sigmoid"):
            raise ValueError(
                f"output_activation must be None, 'softmax' or 'sigmoid', "
                f"got {self.output_activation!r}"
            )
        self.backbone = _MLPBackbone(
            tuple(self.widths), self.activation, self.dropout_rate, self.dtype
        )
        if self.num_classes:
            self.head = nn.Dense(self.num_classes, dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Outputs ``(B, num_classes)``: logits, or probabilities per ``output_activation``."""
        x = self.backbone(x, train)
        if not self.num_classes:
            return x
        x = self.head(x)
        if self.output_activation is not None:
            x = layers.activation(self.output_activation)(x)
        return x


class _MLPBackbone(nn.Module):
    widths: tuple[int, ...]
    activation: str | Callable[[jax.Array], jax.Array]
    dropout_rate: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        act = layers.activation(self.activation)
        x = jnp.asarray(x, self.dtype).reshape(x.shape[0], -1)
        for i, w in enumerate(self.widths):
            x = act(nn.Dense(w, dtype=self.dtype, name=f"dense_{i}")(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return x


@register("mlp")
def mlp(
    widths: Sequence[int] = (128,),
    num_classes: int = 10,
    *,
    activation: str | Callable[[jax.Array], jax.Array] = "relu",
    output_activation: str | None = None,
    dropout_rate: float = 0.0,
    dtype: Dtype = jnp.float32,
) -> MLP:
    """An MLP classifier; see :class:`MLP`.

    >>> import jax, jax.numpy as jnp
    >>> model = mlp((64, 64), num_classes=1, output_activation="sigmoid")
    >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 8)))
    >>> model.apply(variables, jnp.zeros((2, 8))).shape
    (2, 1)
    """
    return MLP(tuple(widths), num_classes, activation, output_activation, dropout_rate, dtype)
