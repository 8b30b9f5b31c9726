"""Faults and mistakes in training, checkpoints, the workdir and data: one true line, fast.

Each case injects one fault (a NaN update, a damaged or poisoned checkpoint, a
second writer, an unwritable folder, a corrupt image, ...) and asserts what jft
promises: the run stops with one line naming the problem (a
:class:`jft.errors.JftError`; exit status 2 from the ``jft`` command), it fails
before anything is compiled where the mistake is in the config or the workdir,
and nothing already saved is lost or changed.
"""

from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jft
from jft.train import checkpoint as ckpt_lib
from jft.train import create_train_state, make_train_step
from jft.train.checkpoint import Checkpointer, CheckpointError


def _listing(directory):
    """Every file and folder under ``directory`` with its size and mtime."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.stat(p)
            out[os.path.relpath(p, directory)] = (st.st_size, st.st_mtime_ns)
    return out


def _mlp_state(rule, *, poison=False):
    model = jft.models.get("mlp", widths=(8,), num_classes=3)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
    if poison:
        variables = jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan), variables)
    state = create_train_state(variables, [(".*", rule)], rng=0)
    return model, state


def _ce(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


BATCH = {"image": np.ones((4, 4), np.float32), "label": np.array([0, 1, 2, 0], np.int32)}


@pytest.mark.parametrize(
    "case",
    [
        "adam_eps0_zero_grad",  # 0 / (sqrt(0) + 0): a NaN update from finite gradients
        "lr_inf",  # inf * g: an Inf (or NaN) update
        "overflow",  # finite update, finite params, their sum overflows to Inf
        "nan_init",  # NaN-filled weights: every new parameter is NaN
    ],
)
def test_nonfinite_update_or_params_skip_the_step(case):
    rule = {
        "adam_eps0_zero_grad": lambda: jft.optim.adam(1e-3, eps=0.0),
        "lr_inf": lambda: optax.scale(float("inf")),  # jft.optim refuses lr=inf itself
        "overflow": lambda: optax.stateless(lambda u, p: jax.tree.map(lambda x: x + 3e38, u)),
        "nan_init": lambda: jft.optim.sgd(1e-3),
    }[case]()
    model, state = _mlp_state(rule, poison=case == "nan_init")
    if case == "adam_eps0_zero_grad":  # a zero gradient for the head bias: labels all absent
        state = state.replace(trainable=jax.tree.map(jnp.zeros_like, state.trainable))
    if case == "overflow":
        trainable = dict(state.trainable, head={**state.trainable["head"]})
        trainable["head"]["bias"] = trainable["head"]["bias"] + 3e38  # the loss stays finite
        state = state.replace(trainable=trainable)
    before = jax.tree.map(np.array, (state.trainable, state.opt_state))
    step = make_train_step(model, [(".*", rule)], _ce, inputs="image", donate=False)
    new, metrics = step(state, BATCH)
    assert int(metrics["nonfinite"]) == 1 and int(new.nonfinite) == 1
    assert np.isfinite(float(metrics["loss"])) or case == "nan_init"
    assert int(new.step) == 1
    after = jax.tree.map(np.array, (new.trainable, new.opt_state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)  # skipped: nothing changed


def test_a_finite_step_still_updates():
    rule = jft.optim.adam(1e-2)
    model, state = _mlp_state(rule)
    before = np.array(state.trainable["head"]["kernel"])
    step = make_train_step(model, [(".*", rule)], _ce, inputs="image", donate=False)
    new, metrics = step(state, BATCH)
    assert int(metrics["nonfinite"]) == 0
    assert not np.array_equal(before, np.array(new.trainable["head"]["kernel"]))


# -- checkpoints ----------------------------------------------------------------------------


def _tiny_state(value=0.0):
    return {
        "params": {"w": jnp.full((4, 3), 1.0 + value), "b": jnp.arange(3.0) + value},
        "opt_state": {"best": jnp.asarray(jnp.inf)},  # an Inf optimizer slot is legitimate
        "step": jnp.asarray(int(value), jnp.int32),
    }


def _tiny_save(ck, step, state):
    return ck.save(step, state, data_state={"next_batch": step}, config={"seed": 0}, force=True)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A checkpoint folder with steps 10, 20, 30 of a small state."""
    directory = tmp_path_factory.mktemp("three") / "checkpoints"
    ck = Checkpointer(directory, every=10, keep=3, async_save=False)
    for step in (10, 20, 30):
        _tiny_save(ck, step, _tiny_state(step))
    ck.close()
    return directory


def _step_files(directory, step):
    root = os.path.join(directory, str(step))
    return sorted(
        os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root) for f in fs
    )


def test_step_files_are_what_the_damage_cases_cover(three_steps):
    # The parametrized damage cases below name every file of a step: a new one fails here.
    assert {f.split("/")[0] for f in _step_files(three_steps, 30)} == {
        "_CHECKPOINT_METADATA",
        "commit_success.txt",
        "config",
        "data_state",
        "checksums",
        "state",
    }


@pytest.mark.parametrize("how", ["delete", "truncate", "empty"])
def test_any_damage_to_the_latest_step_falls_back_with_one_warning(three_steps, tmp_path, how):
    import shutil

    failed = []
    for rel in _step_files(three_steps, 30):
        directory = tmp_path / rel.replace("/", "_") / "checkpoints"
        shutil.copytree(three_steps, directory)
        path = directory / "30" / rel
        if how == "delete":
            os.remove(path)
        else:
            with open(path, "r+b") as f:
                f.truncate(0 if how == "empty" else os.path.getsize(path) // 2)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            try:
                r = Checkpointer(directory, every=10).restore(_tiny_state())
            except Exception as e:  # collected, then reported all at once
                failed.append(f"{rel}: {type(e).__name__}: {e}")
                continue
        mine = [w for w in record if w.category is RuntimeWarning]
        if r.step == 30:  # a file whose loss does not matter: the data is all there, verified
            assert not mine, rel
            expected = _tiny_state(30)
        else:
            assert r.step == 20, rel
            assert len(mine) == 1 and "step 30 is damaged" in str(mine[0].message), rel
            assert "\n" not in str(mine[0].message)
            expected = _tiny_state(20)
        assert r.data_state == {"next_batch": r.step}
        for a, b in zip(jax.tree.leaves(r.state), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=rel)
    assert not failed, "\n".join(failed)


def test_tampered_data_state_is_detected(three_steps, tmp_path):
    import shutil

    directory = tmp_path / "checkpoints"
    shutil.copytree(three_steps, directory)
    path = directory / "30" / "data_state" / "metadata"
    path.write_text(json.dumps({"next_batch": 31}))
    with pytest.warns(RuntimeWarning, match=r"step 30 is damaged.*data_state.*restoring step 20"):
        r = Checkpointer(directory, every=10).restore(_tiny_state())
    assert r.step == 20 and r.data_state == {"next_batch": 20}


def test_a_nonfinite_checkpoint_is_never_written(tmp_path):
    directory = tmp_path / "checkpoints"
    ck = Checkpointer(directory, every=10, async_save=False)
    assert _tiny_save(ck, 10, _tiny_state(10))  # an Inf in the optimizer state is fine
    poisoned = _tiny_state(20)
    poisoned["params"]["b"] = poisoned["params"]["b"].at[1].set(jnp.nan)
    with pytest.raises(CheckpointError) as e:
        _tiny_save(ck, 20, poisoned)
    ck.close()
    msg = str(e.value)
    assert "step 20 not written: params/b holds NaN or Inf" in msg
    assert "the last checkpoint, step 10, is kept" in msg and "\n" not in msg
    assert Checkpointer(directory, every=10).all_steps() == [10]
    assert not [p for p in os.listdir(directory) if p != "10"]


def test_a_nonfinite_checkpoint_on_disk_is_refused_naming_the_step(tmp_path):
    import orbax.checkpoint as ocp

    directory = tmp_path / "checkpoints"
    ck = Checkpointer(directory, every=10, async_save=False)
    _tiny_save(ck, 10, _tiny_state(10))
    # What an older jft wrote: a step whose parameters hold NaN, with matching checksums.
    poisoned = _tiny_state(20)
    poisoned["params"]["w"] = poisoned["params"]["w"] * jnp.nan
    ck._mngr(write=True).save(
        20,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(poisoned),
            data_state=ocp.args.JsonSave({}),
            config=ocp.args.JsonSave({}),
            checksums=ocp.args.JsonSave(ckpt_lib.checksums(poisoned)),
        ),
        force=True,
    )
    ck.close()
    before = _listing(directory)
    with pytest.raises(CheckpointError) as e:
        Checkpointer(directory, every=10).restore(_tiny_state())
    msg = str(e.value)
    assert "step 20 holds NaN or Inf in params/w" in msg
    assert f"move {directory / '20'} aside to resume from step 10" in msg
    with pytest.raises(CheckpointError, match="step 20 holds NaN or Inf in params/w"):
        ckpt_lib.read_params(directory)
    assert _listing(directory) == before
