r"""Update rules as pure functions, each an ``optax.GradientTransformation``.

Each rule is a building block ``scale_by_<rule>`` and a user-facing optimizer
(``adam``, ``heavy_ball``, ...) that chains it with the learning rate; a
learning rate is a float or any optax schedule, looked up as ``schedule(count)``
with ``count`` = 0 at the first update. The conventions (eps outside the square
root, RMSProp without bias correction, AdaGrad's accumulator starting at 0,
AdamW's weight decay 0.01) are those of the named ``torch.optim`` twin; each
docstring says how to get optax's behaviour where optax differs.

jft adds only what optax lacks. Learning-rate schedules, gradient clipping and
plain weight decay are optax's; chain them::

    import optax, jft

    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 10_000)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),   # clip the raw gradient first
        jft.optim.adam(schedule),          # any rule, any schedule
    )
    tx = optax.chain(optax.add_decayed_weights(1e-4), jft.optim.heavy_ball(0.1))  # L2 / coupled

Reduce on plateau scales whatever comes before it and is fed the metric::

    tx = optax.chain(jft.optim.adam(1e-3), jft.optim.reduce_on_plateau(0.1, patience=10))
    updates, state = tx.update(grads, state, params, value=val_loss)

Every factory returns an ``optax.GradientTransformationExtraArgs`` (its
``update`` takes extra keyword arguments such as ``value=``), works under
``optax.inject_hyperparams`` with the same state structure and updates as the
plain rule (e.g. ``optax.inject_hyperparams(jft.optim.adam)(lr=1e-3)``, then set
``state.hyperparams["lr"]``), in ``optax.partition`` and ``optax.MultiSteps``.
Every rule ends with :func:`scale_by_learning_rate`, whose state records the
learning rate of the last update, so that a train step can report it.

Parameters must be floating point or complex (``init`` raises
:class:`ParameterDtypeError`); complex ones follow optax's convention (pass the
conjugate gradient; second moments are :math:`|g|^2 = g \bar g`, so a step does
not depend on a parameter's phase), except in :func:`adaptive_rate`, which
refuses them. ``torch.optim`` treats a complex parameter as two real ones
(``torch.view_as_real``), so its second moments are per real and imaginary part;
for that behaviour give jft the real view, ``jnp.stack([z.real, z.imag], -1)``.
Hyperparameters given as numbers are checked at construction
(:class:`HyperparameterError`: NaN, infinite or out of range).
"""

from jft.optim._validate import HyperparameterError, ParameterDtypeError
from jft.optim.adagrad import AdagradState, adagrad, scale_by_adagrad
from jft.optim.adam import AdamState, adam, adamw, scale_by_adam
from jft.optim.adaptive_rate import adaptive_rate, scale_by_adaptive_rate
from jft.optim.gradient_descent import gradient_descent, sgd
from jft.optim.heavy_ball import HeavyBallState, heavy_ball, scale_by_heavy_ball
from jft.optim.learning_rate import LearningRateState, scale_by_learning_rate
from jft.optim.momentum import MomentumState, momentum, scale_by_momentum
from jft.optim.reduce_on_plateau import ReduceOnPlateauState, reduce_on_plateau
from jft.optim.rmsprop import RMSpropState, rmsprop, scale_by_rmsprop
from jft.optim.subgradient import SubgradientState, scale_by_subgradient, subgradient

__all__ = [
    "AdagradState",
    "AdamState",
    "HeavyBallState",
    "HyperparameterError",
    "LearningRateState",
    "MomentumState",
    "ParameterDtypeError",
    "RMSpropState",
    "ReduceOnPlateauState",
    "SubgradientState",
    "adagrad",
    "adam",
    "adamw",
    "adaptive_rate",
    "gradient_descent",
    "heavy_ball",
    "momentum",
    "reduce_on_plateau",
    "rmsprop",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_adaptive_rate",
    "scale_by_heavy_ball",
    "scale_by_learning_rate",
    "scale_by_momentum",
    "scale_by_rmsprop",
    "scale_by_subgradient",
    "sgd",
    "subgradient",
]
