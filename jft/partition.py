"""Partition parameters by regex rules: which train, with which optimizer, which are frozen.

A *rule* is a pair ``(regex, optimizer_or_None)``. The regex is matched with
``re.fullmatch`` against each parameter's ``/``-joined path
(``backbone/layer1_0/conv1/kernel``); the first matching rule wins; ``None``
freezes the parameter. Every parameter must match a rule and every rule must
match a parameter, or a one-line :class:`PartitionError` says which did not; a
last rule ``".*"`` is a default for whatever is left and may find nothing left.

Frozen parameters cost nothing: :func:`split` separates them from the trainable
ones, :func:`optimizer` holds state for trainable leaves only, and the train
step (:mod:`jft.train`) differentiates only the trainable subtree, so XLA never
builds the backward pass through a frozen trunk.

Both halves of a split are nested dicts with the full key structure but only
their own leaves (empty subtrees pruned), so :func:`merge` is a deep dict union
and either half is an ordinary pytree for optax, orbax and ``jax.jit``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jft._paths import filter_leaves as _filter
from jft._paths import flatten as _flatten
from jft.errors import JftError

__all__ = [
    "FROZEN",
    "GLOBAL_NORM",
    "PartitionError",
    "PartitionState",
    "Rule",
    "Rules",
    "clip_by_global_norm",
    "is_frozen",
    "labels",
    "merge",
    "optimizer",
    "split",
]

Params = Mapping[str, Any]
Rule = tuple[str, optax.GradientTransformation | None]
Rules = Sequence[Rule]

FROZEN = "frozen"
"""The label of frozen parameters in :func:`labels`."""

_MAX_LISTED = 8


class PartitionError(JftError, ValueError):
    """Rules that do not fit the parameters; the one-line message says which."""


# --------------------------------------------------------------------------- paths


def _map(fn: Callable[[str, Any], Any], tree: Params, prefix: str = "") -> dict[str, Any]:
    """Maps ``fn(path, leaf)`` over a nested mapping, keeping its structure."""
    return {
        key: _map(fn, value, f"{prefix}{key}/")
        if isinstance(value, Mapping)
        else fn(f"{prefix}{key}", value)
        for key, value in tree.items()
    }


def _listing(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:_MAX_LISTED])
    more = len(paths) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------- rules


def _compile(rules: Rules) -> list[tuple[re.Pattern[str], optax.GradientTransformation | None]]:
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise PartitionError(
                f"rule {i} must be a (regex, optimizer or None) pair, got {rule!r}"
            )
        regex, tx = rule
        if tx is not None and not isinstance(tx, optax.GradientTransformation):
            raise PartitionError(
                f"rule {i} ({regex!r}) must pair its regex with an "
                f"optax.GradientTransformation or None, got {type(tx).__name__}"
            )
        try:
            compiled.append((re.compile(regex), tx))
        except re.error as e:
            raise PartitionError(f"rule {i} has an invalid regex {regex!r}: {e}") from None
    return compiled


def _first_match(compiled: Sequence[tuple[re.Pattern[str], Any]], path: str) -> int | None:
    """The index of the first rule whose regex fully matches ``path``, or None."""
    for i, (pattern, _) in enumerate(compiled):
        if pattern.fullmatch(path):
            return i
    return None


def _rule_index(paths: Sequence[str], rules: Rules, *, check_dead: bool) -> dict[str, int]:
    """Maps each path to the index of the first rule that fully matches it."""
    compiled = _compile(rules)
    index, unmatched = {}, []
    used = [False] * len(compiled)
    for path in paths:
        i = _first_match(compiled, path)
        if i is None:
            unmatched.append(path)
        else:
            index[path] = i
            used[i] = True
    if unmatched:
        raise PartitionError(
            f"{len(unmatched)} parameter(s) match no rule: {_listing(unmatched)}; "
            'add a rule for them (e.g. (".*", None) last to freeze the rest)'
        )
    dead = [rules[i][0] for i, u in enumerate(used) if not u]
    if dead and dead[-1] == ".*" and rules[-1][0] == ".*":
        dead.pop()  # the default for the rest: a model may have no rest
    if check_dead and dead:
        raise PartitionError(
            f"rule(s) match no parameter (a typo, or shadowed by an earlier rule): "
            f"{_listing([repr(d) for d in dead])}"
        )
    return index


def _label(rules: Rules, i: int) -> str:
    return FROZEN if rules[i][1] is None else str(i)


def labels(params: Params, rules: Rules) -> dict[str, Any]:
    """Labels each parameter with the rule that claims it.

    Args:
      params: a nested dict of parameters (flax ``variables["params"]``).
      rules: ``(regex, optimizer_or_None)`` pairs; the first rule whose regex
        fully matches a parameter's ``/``-joined path claims it.

    Returns:
      A tree with the structure of ``params`` whose leaves are the claiming rule's
      index as a string (``"0"``, ``"1"``, ...), or :data:`FROZEN` for a rule
      whose optimizer is ``None``.

    Raises:
      PartitionError: a parameter matches no rule, a rule matches no parameter,
        a rule's regex is invalid, or a rule is not a pair.

    >>> import optax
    >>> params = {"backbone": {"w": 1.0}, "head": {"w": 2.0, "b": 0.0}}
    >>> labels(params, [("backbone/.*", None), (".*", optax.sgd(0.1))])
    {'backbone': {'w': 'frozen'}, 'head': {'w': '1', 'b': '1'}}
    """
    index = _rule_index(list(_flatten(params)), rules, check_dead=True)
    return _map(lambda path, _: _label(rules, index[path]), params)


def split(params: Params, rules: Rules) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits ``params`` into ``(trainable, frozen)`` by ``rules``.

    Both halves are nested dicts with the keys of ``params`` but only their own
    leaves; subtrees left empty are dropped (so a fully trainable model has
    ``frozen == {}``). :func:`merge` puts them back together.

    Raises:
      PartitionError: as :func:`labels`.

    >>> import optax
    >>> params = {"backbone": {"w": 1.0}, "head": {"w": 2.0}}
    >>> split(params, [("backbone/.*", None), ("head/.*", optax.sgd(0.1))])
    ({'head': {'w': 2.0}}, {'backbone': {'w': 1.0}})
    """
    index = _rule_index(list(_flatten(params)), rules, check_dead=True)
    trainable = _filter(params, lambda p: rules[index[p]][1] is not None)
    frozen = _filter(params, lambda p: rules[index[p]][1] is None)
    return trainable, frozen


def merge(trainable: Params, frozen: Params) -> dict[str, Any]:
    """The deep union of two parameter dicts (the inverse of :func:`split`).

    Raises:
      PartitionError: a parameter path is in both.

    >>> merge({"head": {"w": 2.0}}, {"backbone": {"w": 1.0}, "head": {"b": 0.0}})
    {'head': {'w': 2.0, 'b': 0.0}, 'backbone': {'w': 1.0}}
    """
    out = dict(trainable)
    for key, value in frozen.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
            out[key] = merge(out[key], value)
        else:
            raise PartitionError(f"parameter {key!r} is in both trees being merged")
    return out


def is_frozen(rules: Rules) -> Callable[[str], bool]:
    """Whether ``rules`` freeze a parameter: ``path -> bool`` for ``/``-joined paths.

    A path is frozen when the first rule that fully matches it pairs its regex
    with ``None``; a path no rule matches is not (:func:`labels` refuses it).
    Unlike :func:`labels` it needs no parameter tree, so it also answers for paths
    a tree does not hold (:func:`jft.models.frozen_bn.frozen_bn_patterns` asks
    about a BatchNorm layer's would-be ``scale``).

    Raises:
      PartitionError: a bad rule.

    >>> import optax
    >>> frozen = is_frozen([("backbone/.*", None), (".*", optax.sgd(0.1))])
    >>> frozen("backbone/conv/kernel"), frozen("head/kernel")
    (True, False)
    """
    compiled = _compile(rules)

    def frozen(path: str) -> bool:
        i = _first_match(compiled, path)
        return i is not None and compiled[i][1] is None

    return frozen


# --------------------------------------------------------------------------- optimizer


class PartitionState(NamedTuple):
    """State of :func:`optimizer`: one inner state per rule, ``None`` for frozen rules.

    The inner state of rule ``i`` covers exactly the leaves that rule ``i``
    claims (a nested dict of them), so frozen leaves hold no state at all.
    """

    inner_states: tuple[Any, ...]


GLOBAL_NORM = "global_grad_norm"
"""The extra argument by which :func:`optimizer` tells each rule the norm of all its updates."""


def clip_by_global_norm(max_norm: jax.typing.ArrayLike) -> optax.GradientTransformationExtraArgs:
    r"""``optax.clip_by_global_norm`` that clips by the norm of *every* trainable gradient.

    .. math::

        g \leftarrow g \cdot \min\left(1, \frac{c}{\lVert g_{\text{all}} \rVert_2}\right)

    Inside a rule of :func:`optimizer`, :math:`g_{\text{all}}` is the gradient of
    every trainable parameter, all rules together (frozen ones excluded), which
    :func:`optimizer` passes as the extra argument ``global_grad_norm``; so each
    rule's ``optax.chain(clip_by_global_norm(c), tx)`` scales by the same factor,
    as ``torch.nn.utils.clip_grad_norm_`` over all parameters before the
    per-group optimizers. Alone, it is ``optax.clip_by_global_norm`` (same
    formula, same empty state).

    Args:
      max_norm: the largest norm :math:`c` (``> 0``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an empty state.

    Note:
      ``optax.clip_by_global_norm`` in a rule clips by that rule's own norm.
    """

    def update_fn(updates, state, params=None, **extra_args: Any):
        del params
        norm = extra_args.get(GLOBAL_NORM)
        norm = optax.tree.norm(updates) if norm is None else norm
        trigger = jnp.squeeze(norm < max_norm)  # optax's formula, a select per leaf

        def clip(t):
            return jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def optimizer(rules: Rules) -> optax.GradientTransformationExtraArgs:
    """One optimizer per rule, applied to the leaves the rule claims.

    The contract: give it the *trainable* half of :func:`split` (that is what
    :mod:`jft.train` does). It also accepts the full parameter tree; then the
    leaves of frozen rules get no optimizer state and zero updates, though their
    gradients were still computed by whoever produced ``updates``. Rules that
    claim no leaf of the tree it sees are allowed here (the frozen rules never do
    on the trainable half); their optimizer is initialised on an empty dict.

    Args:
      rules: ``(regex, optimizer_or_None)`` pairs, as for :func:`labels`.

    Each rule's ``update`` is given the extra argument ``global_grad_norm``, the
    norm of the updates of all its trainable rules, which
    :func:`clip_by_global_norm` reads.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`PartitionState`.

    Raises:
      PartitionError: at ``init``/``update``, a leaf that matches no rule, or a bad
        rule.

    >>> import jax, jax.numpy as jnp, optax
    >>> rules = [("backbone/.*", None), ("head/.*", optax.adam(1e-3))]
    >>> params = {"backbone": {"w": jnp.ones(1000)}, "head": {"w": jnp.ones(10)}}
    >>> state = optimizer(rules).init(params)
    >>> sum(x.size for x in jax.tree.leaves(state))  # count, mu and nu of the head
    21
    """
    _compile(rules)  # fail early on a bad rule

    def groups(tree: Params) -> list[dict[str, Any] | None]:
        index = _rule_index(list(_flatten(tree)), rules, check_dead=False)
        return [
            None if tx is None else _filter(tree, lambda p, i=i: index[p] == i)
            for i, (_, tx) in enumerate(rules)
        ]

    def init_fn(params):
        return PartitionState(
            tuple(
                None if tx is None else tx.init(sub)
                for (_, tx), sub in zip(rules, groups(params), strict=True)
            )
        )

    def update_fn(updates, state, params=None, **extra_args: Any):
        update_groups = groups(updates)
        trained = [u for (_, tx), u in zip(rules, update_groups, strict=True) if tx is not None]
        extra_args = {GLOBAL_NORM: optax.tree.norm(trained), **extra_args}
        param_groups = groups(params) if params is not None else [None] * len(rules)
        flat_out: dict[str, Any] = {}
        inner_states = []
        for (_, tx), u, s, p in zip(
            rules, update_groups, state.inner_states, param_groups, strict=True
        ):
            if tx is None:
                inner_states.append(None)
                continue
            u, s = optax.with_extra_args_support(tx).update(u, s, p, **extra_args)
            flat_out.update(_flatten(u))
            inner_states.append(s)
        # Leaves of frozen rules (only present when given the full tree) get zeros.
        new_updates = _map(
            lambda path, g: flat_out[path] if path in flat_out else jnp.zeros_like(g), updates
        )
        return new_updates, PartitionState(tuple(inner_states))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
