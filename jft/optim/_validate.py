"""Checks of hyperparameters that are given as concrete numbers.

A value that is not a concrete Python or NumPy number (a schedule, a ``jax.Array``,
a tracer under ``optax.inject_hyperparams``) passes through unchecked, so that
every factory still traces; only numbers given at construction are checked.
"""

import math
import numbers

import numpy as np


def _number(value) -> float | None:
    """The value as a float if it is a concrete real Python/NumPy scalar, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.number):
        return float(value)
    return None


def nonnegative(value, name: str) -> None:
    """Raises ValueError if ``value`` is a number that is NaN or negative."""
    x = _number(value)
    if x is not None and (math.isnan(x) or x < 0):
        raise ValueError(f"{name} must be a non-negative number, got {name}={value!r}")


def learning_rate(value, name: str = "lr") -> None:
    """Raises ValueError for a negative or NaN learning rate (schedules pass)."""
    if not callable(value):
        nonnegative(value, name)


def unit_interval(value, name: str) -> None:
    """Raises ValueError if ``value`` is a number outside [0, 1) (or NaN)."""
    x = _number(value)
    if x is not None and not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {name}={value!r}")


def finite_nonnegative(value, name: str) -> None:
    """Raises ValueError if ``value`` is a number that is NaN, infinite or negative."""
    x = _number(value)
    if x is not None and not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{name} must be a finite non-negative number, got {name}={value!r}")


def is_zero(value) -> bool:
    """True if ``value`` is a concrete number equal to 0 (a traced value never is)."""
    return _number(value) == 0.0
