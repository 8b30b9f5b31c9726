"""Checks of hyperparameters given as concrete numbers, and of the parameters' dtypes.

A hyperparameter that is not a concrete number (a schedule, a tracer under
``jax.jit``) passes through unchecked, so that every factory still traces;
concrete numbers (Python, NumPy or ``jax.Array`` scalars, as
``optax.inject_hyperparams`` passes them to ``init``) are checked. Parameters
are checked by dtype alone in each rule's ``init``, which works under
``jax.jit`` and ``jax.eval_shape``.
"""

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jft.errors import JftError


class HyperparameterError(JftError, ValueError):
    """A hyperparameter given as a number is out of its range (NaN, infinite, negative...)."""


class ParameterDtypeError(JftError, TypeError):
    """A parameter's dtype has no meaning for the rule (integers; complex for some rules)."""


def _number(value) -> float | None:
    """The value as a float if it is a concrete scalar (Python, NumPy or a ``jax.Array``
    that is not a tracer), else None. Complex scalars, which ``inject_hyperparams``
    makes of real ones for complex parameters, give their real part."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, np.ndarray | jax.Array) and value.ndim == 0:
        if jnp.issubdtype(value.dtype, jnp.number) and not jnp.issubdtype(value.dtype, jnp.bool_):
            return float(np.real(np.asarray(value)))
    return None


def nonnegative(value, name: str) -> None:
    """Raises HyperparameterError if ``value`` is a number that is NaN, infinite or negative."""
    x = _number(value)
    if x is not None and not (math.isfinite(x) and x >= 0):
        raise HyperparameterError(
            f"jft.optim: {name} must be a finite number >= 0, got {name}={x!r}; pass one"
        )


def learning_rate(value, name: str = "lr") -> None:
    """Raises HyperparameterError for a NaN, infinite or negative learning rate (schedules pass)."""
    if not callable(value):
        nonnegative(value, name)


def unit_interval(value, name: str) -> None:
    """Raises HyperparameterError if ``value`` is a number outside [0, 1) (or NaN)."""
    x = _number(value)
    if x is not None and not 0.0 <= x < 1.0:
        raise HyperparameterError(
            f"jft.optim: {name} must be in [0, 1), got {name}={x!r}; pass a number in [0, 1)"
        )


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts) or "params"


def parameters(params, rule: str, *, complex_reason: str | None = None) -> None:
    """Raises ParameterDtypeError unless every parameter is floating point (or complex).

    Args:
      params: the parameter pytree given to ``init``; leaves without a dtype
        (optax's placeholders) are skipped.
      rule: the factory's name, for the message.
      complex_reason: if given, complex parameters are refused with this reason.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            continue
        name = _path_name(path)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            if complex_reason is not None:
                raise ParameterDtypeError(
                    f"jft.optim.{rule}: parameter {name!r} has dtype {dtype}; {complex_reason}"
                )
        elif not jnp.issubdtype(dtype, jnp.floating):
            raise ParameterDtypeError(
                f"jft.optim.{rule}: parameter {name!r} has dtype {dtype}; update rules need "
                "floating-point (or complex) parameters: cast it (e.g. to float32) or freeze it"
            )


def checked(
    tx: optax.GradientTransformation, rule: str, *, complex_reason: str | None = None
) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose ``init`` first checks the parameters' dtypes, naming ``rule`` in the error.

    The state is ``tx``'s own; ``update`` accepts extra keyword arguments.
    """
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        parameters(params, rule, complex_reason=complex_reason)
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init_fn, tx.update)
