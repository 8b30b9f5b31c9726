"""One process of the multi-process test (tests/test_multiprocess.py), and the run it shares.

Run as ``python tests/_mp_worker.py OUT.npz`` with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set: it joins the run through
:func:`jft.train.distributed.initialize`, trains the small CNN under ``"jit"``
over the global mesh, feeding only its own rows of each global batch, and
process 0 writes the final parameters, BatchNorm statistics and eval sums.

The run uses plain SGD, whose update is linear in the gradient: the only
difference two layouts may show is the rounding of the cross-device sums,
carried forward smoothly (see ``TOLERANCE`` in tests/test_multiprocess.py).
Adam's first steps are ``±lr·sign(g)``, which turns rounding noise in a
gradient that is zero in exact arithmetic into an lr-sized difference, so a
comparison under Adam depends on the machine's reduction order.
"""

from __future__ import annotations

import sys

import numpy as np

GLOBAL_BATCH = 32
STEPS = 10
LR = 0.1
EVAL_ROWS = 40  # padded to 48: the last 8 rows are masked out


def global_batches(steps: int = STEPS) -> list[dict[str, np.ndarray]]:
    """The same global batches in every process (seeded)."""
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.normal(size=(GLOBAL_BATCH, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32),
        }
        for _ in range(steps)
    ]


def eval_batch() -> dict[str, np.ndarray]:
    """One eval batch of 48 rows, the last 8 padding (mask False, garbage labels)."""
    rng = np.random.default_rng(1)
    n = 48
    return {
        "image": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
        "label": rng.integers(0, 10, n).astype(np.int32),
        "mask": np.arange(n) < EVAL_ROWS,
    }


def run(
    parallel: str,
    mesh=None,
    process_index: int = 0,
    process_count: int = 1,
    *,
    batches: list[dict[str, np.ndarray]] | None = None,
    grad_accum_steps: int = 1,
):
    """Trains ``STEPS`` steps; returns the host state and the eval sums (global arrays).

    ``batches`` replaces the global batches and ``grad_accum_steps`` splits each
    into microbatches (BatchNorm statistics then come from a part of the batch):
    the test's negative controls.
    """
    import jax
    import optax

    import jft.models
    from jft import train
    from jft.train import metrics
    from jft.train import parallel as par

    model = jft.models.get("cnn", widths=(8, 16), num_classes=10, dropout_rate=0.0)
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((2, 8, 8, 1), np.float32))
    variables = jax.tree.map(np.asarray, variables)
    rules = [(".*", optax.sgd(LR))]
    loss = train.losses.get("softmax_xent")
    mode = par.Parallel(parallel, mesh)
    state = mode.place_state(train.create_train_state(variables, rules))
    step = train.make_train_step(
        model, rules, loss, parallel=mode, grad_accum_steps=grad_accum_steps
    )

    def local(batch):
        rows = next(iter(batch.values())).shape[0] // process_count
        return {k: v[process_index * rows : (process_index + 1) * rows] for k, v in batch.items()}

    for batch in global_batches() if batches is None else batches:
        state, _ = step(state, mode.shard_batch(local(batch)))
    eval_step = metrics.make_eval_step(model, num_classes=10, parallel=mode)
    sums = eval_step(state, mode.shard_batch(local(eval_batch())))
    return mode.host_state(state), sums


def _numpy(x):
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)  # replicated: any copy
    return np.asarray(x)


def main(out: str) -> None:
    """Joins the run, trains, and (process 0) writes ``out``."""
    import jax
    from flax import traverse_util

    from jft.train import distributed
    from jft.train import parallel as par

    assert distributed.initialize(), "the environment should ask for a multi-process run"
    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    state, sums = run("jit", par.make_mesh(), jax.process_index(), jax.process_count())
    arrays = {
        **traverse_util.flatten_dict({"params": state.params}, sep="/"),
        **traverse_util.flatten_dict({"batch_stats": state.batch_stats}, sep="/"),
        **{f"sums/{k}": v for k, v in sums.items()},
    }
    arrays = {k: _numpy(v) for k, v in arrays.items()}
    if jax.process_index() == 0:
        np.savez(out, **arrays)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
