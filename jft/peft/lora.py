"""LoRA on any linen model: the base module's output plus low-rank terms, never a changed base.

:func:`lora` wraps a model in a :class:`LoraModel`, which has the model's own
parameter paths (it shares the model's scope) and runs it under a flax method
interceptor: each targeted ``Dense``, ``DenseGeneral`` or ``Conv`` computes its
own output from the frozen kernel, then adds the adapter's term computed from
its input activations,

.. math::

  y = x W + b + s \\, \\mathrm{dropout}(x) A B,

(a ``Conv`` runs :math:`A` as a convolution with its own kernel size and strides
and :math:`B` as a 1x1 one, as PEFT's ``Conv2d`` does). :math:`W + s A B` is never
formed in the forward pass, so the kernel's gradient is never computed: with
the base frozen by :func:`jft.peft.adapter_rules`, a step costs the forward pass,
the backward pass through the activations, and the adapters' own small products.

DoRA (Liu et al., 2024), as PEFT computes it: with :math:`m` the learned
magnitude per output feature and :math:`n = \\lVert W + s A B \\rVert` the norm
of each output feature's weights (treated as a constant, no gradient),

.. math::

  y = x W + b + (m / n - 1) \\, x' W + (m / n) \\, s \\, x' A B,

where :math:`x'` is the dropped-out input (:math:`x` in evaluation).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jft.peft.config import LoraConfig, LoraError, adapters, resolve_targets
from jft.peft.quant import apply_quantized, dequantize

__all__ = ["LoraModel", "check_targets", "init_adapters", "lora"]

_ADAPTABLE = (nn.Dense, nn.DenseGeneral, nn.Conv)


def _path(module: nn.Module) -> str:
    scope = module.scope
    return "/".join(scope.path) if scope is not None else ""


def _uniform(bound: float):
    # PEFT's lora_A init: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dense_general_dims(module: nn.DenseGeneral, x: jax.Array) -> tuple[tuple[int, ...], ...]:
    """(contracted axes of x, their sizes, the output feature shape) of a DenseGeneral."""
    if module.batch_dims:
        raise LoraError(
            f"{_path(module)}: LoRA cannot adapt a DenseGeneral with batch_dims="
            f"{module.batch_dims}; leave it out of lora.targets"
        )
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    axis = tuple(a % x.ndim for a in axis)
    features = module.features if isinstance(module.features, tuple) else (module.features,)
    return axis, tuple(x.shape[a] for a in axis), features


class _Adapter:
    """The adapter of one module call: its parameters, and the term it adds."""

    def __init__(self, module: nn.Module, x: jax.Array, config: LoraConfig, kernel: Any = None):
        self.module, self.config = module, config
        if kernel is None:
            kernel = module.get_variable("params", "kernel")
        if kernel is None:
            raise LoraError(f"{_path(module)}: no kernel to adapt; is its params tree complete?")
        r = config.rank
        if isinstance(module, nn.DenseGeneral):
            self.axis, in_shape, features = _dense_general_dims(module, x)
            fan_in, out = math.prod(in_shape), math.prod(features)
            a_shape = (fan_in, r)
        elif isinstance(module, nn.Conv):
            if module.feature_group_count != 1:
                raise LoraError(
                    f"{_path(module)}: LoRA cannot adapt a grouped Conv "
                    f"(feature_group_count={module.feature_group_count}); leave it out of "
                    "lora.targets"
                )
            fan_in, out = math.prod(kernel.shape[:-1]), kernel.shape[-1]
            a_shape = (*kernel.shape[:-1], r)  # a conv kernel: same window, r output channels
        else:
            fan_in, out = kernel.shape[0], kernel.shape[-1]
            a_shape = (fan_in, r)
        if kernel.size != fan_in * out:
            raise LoraError(
                f"{_path(module)}: kernel {tuple(kernel.shape)} does not fit an input of "
                f"{fan_in} features; leave it out of lora.targets"
            )
        self.kernel, self.fan_in, self.out = kernel, fan_in, out
        self.dtype = getattr(module, "dtype", None) or jnp.result_type(x, kernel)
        if not module.is_mutable_collection("params") and not module.has_variable(
            "params", "lora_A"
        ):
            raise LoraError(
                f"{_path(module)} is a LoRA target without adapter parameters; add them with "
                "jft.peft.init_adapters(model, variables, *example_inputs) or load_adapter"
            )
        self.a = module.param("lora_A", _uniform(1 / math.sqrt(fan_in)), a_shape)
        self.b = module.param("lora_B", nn.initializers.zeros, (r, out))
        if config.use_dora:
            self.m = module.param("lora_magnitude", lambda _: self.weight_norm())

    def weight_norm(self) -> jax.Array:
        """:math:`\\lVert W + s A B \\rVert` per output feature, in float32, no gradient."""
        f32 = jnp.float32
        w = self.kernel.reshape(self.fan_in, self.out).astype(f32)
        lora_w = jnp.matmul(
            self.a.reshape(self.fan_in, -1).astype(f32),
            self.b.astype(f32),
            precision=jax.lax.Precision.HIGHEST,
        )
        return jax.lax.stop_gradient(jnp.linalg.norm(w + self.config.scale * lora_w, axis=0))

    def low_rank(self, x: jax.Array, factor: jax.Array | None = None) -> jax.Array:
        """:math:`s \\, x A B` in the module's compute dtype, shaped as the module's output.

        :math:`s` (and ``factor``, one float32 per output feature) scale the columns
        of :math:`B` (``r x out``) rather than the output (``tokens x out``): the
        same product, one elementwise pass over the activations fewer each way.
        """
        module, dt = self.module, self.dtype
        b = self.b.astype(jnp.float32) * self.config.scale
        a, b = self.a.astype(dt), (b if factor is None else b * factor).astype(dt)
        x = x.astype(dt)
        if isinstance(module, nn.Conv):
            conv = module.clone(parent=None, features=self.config.rank, use_bias=False)
            h = conv.apply({"params": {"kernel": a}}, x)
        elif isinstance(module, nn.DenseGeneral):
            in_axes = tuple(range(len(self.axis)))
            a = a.reshape(*(x.shape[i] for i in self.axis), -1)
            h = jax.lax.dot_general(x, a, ((self.axis, in_axes), ((), ())))
        else:
            h = x @ a
        y = h @ b
        if isinstance(module, nn.DenseGeneral):
            y = y.reshape(*y.shape[:-1], *_features(module))
        return y

    def base_without_bias(self, x: jax.Array) -> jax.Array:
        """:math:`x W`: the module's own computation on ``x``, without its bias."""
        plain = self.module.clone(parent=None, use_bias=False)
        return plain.apply({"params": {"kernel": self.kernel}}, x)

    def magnitude_scale(self) -> jax.Array:
        """:math:`m / n` in float32, one per output feature."""
        return self.m.astype(jnp.float32) / self.weight_norm()

    def per_output(self, v: jax.Array) -> jax.Array:
        """``v`` (one per output feature) in the compute dtype, shaped to broadcast."""
        v = v.astype(self.dtype)
        if isinstance(self.module, nn.DenseGeneral):
            return v.reshape(_features(self.module))
        return v


def _quantized(module: nn.Module) -> bool:
    return module.scope is not None and module.has_variable("params", "kernel_scale")


def _dequantized(module: nn.Module, dtype: Any) -> jax.Array:
    get = lambda name: module.get_variable("params", name)
    return dequantize(get("kernel"), get("kernel_scale"), dtype)


def _run_quantized(module: nn.Module, x: jax.Array) -> jax.Array:
    if not isinstance(module, _ADAPTABLE):
        raise LoraError(
            f"{_path(module)}: a {type(module).__name__} holds a quantized kernel; only Dense, "
            "DenseGeneral and Conv kernels can be quantized: skip it in quantize_base"
        )
    return apply_quantized(module, x)


def _features(module: nn.DenseGeneral) -> tuple[int, ...]:
    return module.features if isinstance(module.features, tuple) else (module.features,)


def _interceptor(targets: frozenset[str] | None, config: LoraConfig, train: bool, seen: set[str]):
    """The method interceptor that adds the adapters; ``targets=None``: match as called (init)."""
    busy = []  # the adapter's own conv runs as a module too: leave it alone
    patterns = [re.compile(t) for t in config.targets]

    def targeted(module: nn.Module) -> bool:
        path = _path(module)
        if targets is not None:
            return path in targets
        # Init: containers whose paths match too are passed through; resolve_targets
        # checks the finished tree.
        return isinstance(module, _ADAPTABLE) and any(
            p.fullmatch(path) or p.fullmatch(f"{path}/kernel") for p in patterns
        )

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if busy or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if not targeted(module):
            if _quantized(module):
                return _run_quantized(module, args[0])
            return next_fun(*args, **kwargs)
        busy.append(module)
        try:
            return adapt(next_fun, module, args, kwargs)
        finally:
            busy.pop()

    def adapt(next_fun, module, args, kwargs):
        path = _path(module)
        if not isinstance(module, _ADAPTABLE):
            raise LoraError(
                f"{path}: LoRA cannot adapt a {type(module).__name__} (only Dense, DenseGeneral "
                "and Conv); narrow lora.targets"
            )
        seen.add(path)
        x = args[0]
        if _quantized(module):
            y = _run_quantized(module, x)
            adapter = _Adapter(module, x, config, kernel=_dequantized(module, jnp.float32))
        else:
            y = next_fun(*args, **kwargs)
            adapter = _Adapter(module, x, config)
        dropped = x
        if train and config.dropout > 0:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1 - config.dropout, x.shape)
            dropped = jnp.where(keep, x / (1 - config.dropout), 0).astype(x.dtype)
        if not config.use_dora:
            term = adapter.low_rank(dropped)
        else:
            if dropped is x:
                bias = module.get_variable("params", "bias")
                base = y if bias is None else y - bias.astype(y.dtype)
            else:  # PEFT recomputes the base term on the dropped-out input
                base = adapter.base_without_bias(dropped)
            mag = adapter.magnitude_scale()
            base_term = adapter.per_output(mag - 1) * base.astype(adapter.dtype)
            term = base_term + adapter.low_rank(dropped, factor=mag)
        return y + term.astype(y.dtype)

    return intercept


class LoraModel(nn.Module):
    """``base`` with LoRA adapters on the modules that ``config.targets`` match.

    The parameter tree is ``base``'s with ``lora_A``, ``lora_B`` (and for DoRA
    ``lora_magnitude``) added inside each adapted module; add them with
    :func:`init_adapters`. Call it as ``base`` is called; adapter dropout is on
    when the call passes ``train=True`` as a keyword (as :mod:`jft.train` does)
    and needs a ``"dropout"`` rng.

    ``clone(dtype=...)`` and ``clone(frozen_bn=...)`` pass through to ``base``, so
    :func:`jft.train.make_train_step`'s ``compute_dtype`` and frozen BatchNorm work.

    Attributes:
      base: the linen model to adapt; its parameters are never modified.
      config: the :class:`~jft.peft.LoraConfig`.
    """

    base: nn.Module
    config: LoraConfig

    def setup(self) -> None:
        nn.share_scope(self, self.base)  # the base's parameter paths, unprefixed

    @property
    def dtype(self) -> Any:
        """The base model's compute dtype."""
        return self.base.dtype

    @property
    def frozen_bn(self) -> Any:
        """The base model's frozen BatchNorm patterns (AttributeError if it has none)."""
        return self.base.frozen_bn

    def clone(self, *, parent=None, _deep_clone=False, _reset_names=False, **updates):
        """A copy; updates of fields that :class:`LoraModel` does not have go to ``base``."""
        own = {"base", "config", "name", "parent"}
        base_updates = {k: updates.pop(k) for k in list(updates) if k not in own}
        if base_updates:
            updates["base"] = updates.get("base", self.base).clone(**base_updates)
        return super().clone(
            parent=parent, _deep_clone=_deep_clone, _reset_names=_reset_names, **updates
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Runs ``base(*args, **kwargs)`` with the adapters.

        Under ``init`` (no parameters yet) the targets are the modules whose paths
        the regexes match as they are called, checked against the new tree after.
        """
        initializing = self.is_initializing() and not self.variables.get("params")
        targets = None
        if not initializing:
            targets = frozenset(resolve_targets(self.variables["params"], self.config))
        seen: set[str] = set()
        interceptor = _interceptor(targets, self.config, bool(kwargs.get("train")), seen)
        with nn.intercept_methods(interceptor):
            out = self.base(*args, **kwargs)
        if initializing:
            targets = frozenset(resolve_targets(self.variables["params"], self.config))
        missed = sorted(targets - seen)
        if missed:
            raise LoraError(
                f"lora.targets matched {missed[0]!r} ({len(missed)} module(s) in all), which "
                "the model never calls as a Dense, DenseGeneral or Conv; narrow the regex"
            )
        return out


def lora(model: nn.Module, config: LoraConfig) -> LoraModel:
    """``model`` with LoRA adapters as ``config`` says: a :class:`LoraModel`.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jft.peft import LoraConfig, init_adapters
    >>> base = nn.Dense(4, name="proj")
    >>> x = jnp.ones((2, 3))
    >>> variables = base.init(jax.random.key(0), x)
    >>> model = lora(base, LoraConfig(targets=(".*",), rank=2))
    >>> variables = init_adapters(model, variables, x)
    >>> {k: v.shape for k, v in sorted(variables["params"].items())}
    {'bias': (4,), 'kernel': (3, 4), 'lora_A': (3, 2), 'lora_B': (2, 4)}
    >>> bool(jnp.allclose(model.apply(variables, x), base.apply(variables, x)))  # B starts at 0
    True
    """
    return LoraModel(base=model, config=config)


def init_adapters(
    model: LoraModel,
    variables: Mapping[str, Any],
    *args: Any,
    rng: int | jax.Array = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """``variables`` with fresh adapter parameters added: :math:`A` random, :math:`B = 0`.

    As in PEFT, :math:`A \\sim U(-1/\\sqrt{\\mathrm{fan\\_in}}, 1/\\sqrt{\\mathrm{fan\\_in}})`
    and :math:`B = 0`, so the adapted model starts equal to the base; DoRA's
    magnitude starts at the norm of each output feature's weights. The example
    inputs (``args``, ``kwargs``, as for ``model.init``) are traced once, in
    evaluation mode, to find each target's kind and shapes. The base arrays are
    not copied: the result holds the same arrays plus the new ones.

    Raises:
      LoraError: a target that matches nothing or that LoRA cannot adapt.
    """
    resolve_targets(variables["params"], model.config)  # fail before tracing
    key = jax.random.key(rng) if isinstance(rng, int) else rng

    def run(variables, key):
        _, updated = model.apply(
            variables, *args, rngs={"params": key}, mutable=["params"], **kwargs
        )
        return adapters(updated["params"])

    new = jax.jit(run)(variables, key)
    out = dict(variables)
    out["params"] = _union(variables["params"], new)
    return out


def check_targets(model: LoraModel, *args: Any, **kwargs: Any) -> Any:
    """The shapes of ``model``'s variables, adapters included, traced and never compiled.

    Initializes ``model`` under :func:`jax.eval_shape` on example inputs (``args``,
    ``kwargs`` as for ``model.init``: a batch of one will do), so
    a target that cannot be adapted is found before any weights, data or compiled
    program exist, in the time it takes to trace the model once.

    Raises:
      LoraError: a target regex that matches no module, a matched module without a
        kernel, or one that LoRA cannot adapt (a grouped Conv, a custom module).
    """
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))


def _union(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _union(out[k], v) if isinstance(v, Mapping) and k in out else v
    return out
