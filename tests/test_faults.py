"""Faults and mistakes in training, checkpoints, the workdir and data: one true line, fast.

Each case injects one fault (a NaN update, a damaged or poisoned checkpoint, a
second writer, an unwritable folder, a corrupt image, ...) and asserts what jft
promises: the run stops with one line naming the problem (a
:class:`jft.errors.JftError`; exit status 2 from the ``jft`` command), it fails
before anything is compiled where the mistake is in the config or the workdir,
and nothing already saved is lost or changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import PIL.Image
import pytest

import jft
from jft.train import checkpoint as ckpt_lib
from jft.train import create_train_state, make_train_step
from jft.train.checkpoint import Checkpointer, CheckpointError
from jft.train.lock import WorkdirError, WorkdirLock


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


# -- the workdir: one writer, writable, fails before anything is compiled -------------------

RUN = [
    "--config=digits_mlp",
    "--config.progress=False",
    "--config.log_every=5",
    "--config.eval_every=0",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One prepared digits data dir for every subprocess of this file."""
    path = tmp_path_factory.mktemp("tfds")
    env = dict(os.environ, JFT_DATA_DIR=str(path))
    os.environ.setdefault("JFT_DATA_DIR", str(path))
    jft.data.info({"name": "digits", "data_dir": str(path)})
    return env


def _env(data_dir):
    env = dict(data_dir)
    env.pop("XLA_FLAGS", None)  # one CPU device per run
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return env


def _jft(data_dir, workdir, *extra, timeout=300):
    """``jft train`` in a subprocess: (exit status, stdout, stderr lines, seconds)."""
    cmd = [sys.executable, "-m", "jft.cli", "train", *RUN, f"--workdir={workdir}", *extra]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=_env(data_dir), capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    return out.returncode, out.stdout, lines, time.perf_counter() - t0


def _assert_one_line_error(rc, stdout, lines, *needles):
    assert rc == 2, lines[-20:]
    assert lines and lines[-1].startswith("jft train: error: "), lines[-20:]
    assert not any("Traceback" in ln for ln in lines), lines[-40:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    # Failed before the data, the model or the step: nothing was restored or compiled.
    assert "starting at step" not in stdout


@contextlib.contextmanager
def _tmpfs(path, *options):
    """A small tmpfs mounted on ``path`` (a read-only one, a full one): needs root."""
    os.makedirs(path, exist_ok=True)
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, f"mount a tmpfs (these cases need root): {out.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_second_writer_fails_at_once_naming_the_holder(data_dir, tmp_path):
    workdir = tmp_path / "run"
    lock = workdir / ".jft.lock"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jft.cli",
            "train",
            *RUN,
            f"--workdir={workdir}",
            "--config.num_steps=1000000",
            "--config.checkpoint.every=50",
        ],
        env=_env(data_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t0 = time.time()
        while not (lock.exists() and lock.read_text().strip()):
            assert first.poll() is None and time.time() - t0 < 900
            time.sleep(0.05)
        assert f"pid {first.pid} on host {socket.gethostname()}" in lock.read_text()
        rc, stdout, lines, _ = _jft(data_dir, workdir, "--config.num_steps=1000000")
        _assert_one_line_error(
            rc, stdout, lines, str(workdir), f"pid {first.pid} on host {socket.gethostname()}"
        )
        assert "in use by another jft run" in lines[-1]
        assert first.poll() is None  # the holder runs on, untouched
    finally:
        first.kill()
        first.wait()
    # SIGKILL leaves the lock file behind, holding a dead pid: the kernel dropped the
    # lock itself, so the next run takes it.
    assert lock.exists()
    with WorkdirLock(workdir) as taken:
        assert f"pid {os.getpid()} " in lock.read_text()
        with pytest.raises(WorkdirError, match=f"in use by another jft run .pid {os.getpid()}"):
            WorkdirLock(workdir).acquire()
    assert not lock.exists() and taken.path == str(lock)


def test_each_process_of_a_multiprocess_run_has_its_own_lock(tmp_path):
    with WorkdirLock(tmp_path, 0), WorkdirLock(tmp_path, 1):
        assert sorted(os.listdir(tmp_path)) == [".jft.lock", ".jft.lock.1"]
        with pytest.raises(WorkdirError):
            WorkdirLock(tmp_path, 1).acquire()
    assert os.listdir(tmp_path) == []


def test_a_file_as_workdir_fails_before_anything(data_dir, tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("not a folder")
    before = _listing(tmp_path)
    rc, stdout, lines, _ = _jft(data_dir, workdir)
    _assert_one_line_error(rc, stdout, lines, str(workdir), "a file is in the way")
    assert _listing(tmp_path) == before


def test_a_read_only_workdir_fails_before_anything(data_dir, tmp_path):
    with _tmpfs(tmp_path / "ro", "ro", "size=64k") as workdir:
        rc, stdout, lines, _ = _jft(data_dir, workdir)
        _assert_one_line_error(rc, stdout, lines, str(workdir), "read-only file system")
        assert os.listdir(workdir) == []


def test_read_only_checkpoints_fail_before_anything_and_change_nothing(data_dir, tmp_path):
    # Once: a 313 s hang inside orbax, then hundreds of traceback lines.
    workdir = tmp_path / "run"
    rc, *_ = _jft(data_dir, workdir, "--config.num_steps=10", "--config.checkpoint.every=10")
    assert rc == 0
    with _tmpfs(workdir / "checkpoints", "ro", "size=64k"):
        before = _listing(workdir)
        rc, stdout, lines, _ = _jft(data_dir, workdir, "--config.num_steps=20", timeout=120)
        _assert_one_line_error(
            rc, stdout, lines, str(workdir / "checkpoints"), "read-only file system"
        )
        assert _listing(workdir) == before


def test_a_full_disk_stops_with_one_line_naming_the_step(data_dir, tmp_path):
    workdir = tmp_path / "run"
    with _tmpfs(workdir / "checkpoints", "size=48k"):  # less than one checkpoint
        rc, stdout, lines, _ = _jft(
            data_dir, workdir, "--config.num_steps=10", "--config.checkpoint.every=10"
        )
        assert rc == 2, lines[-20:]
        assert len(lines) == 1, lines[-40:]  # not orbax's threads' tracebacks
        assert lines[-1].startswith("jft train: error: checkpoint ")
        assert "step 10 could not be written (the disk is full)" in lines[-1]
        assert "no step is complete" in lines[-1]


# -- data -----------------------------------------------------------------------------------


def _image_folder(root, classes, per_class=8, truncate=()):
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            x = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            PIL.Image.fromarray(x).save(root / cls / f"{i}.jpg", quality=90)
    for rel in truncate:
        path = root / rel
        path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    return root


def test_corrupt_images_are_named_when_the_folder_is_prepared(tmp_path):
    # Once: "Truncated File Read" at step 0, no file named.
    bad = ("b/3.jpg", "a/0.jpg", "c/7.jpg")
    root = _image_folder(tmp_path / "imgs", "abc", truncate=bad)
    cfg = {"name": "image_folder", "path": str(root), "data_dir": str(tmp_path / "d")}
    cfg["eval_split"] = "validation"
    t0 = time.process_time()  # CPU seconds: the same on a loaded machine
    with pytest.raises(jft.data.DataError) as e:
        jft.data.info(cfg)
    assert time.process_time() - t0 < 30
    msg = str(e.value)
    assert "\n" not in msg and "3 of 24 images cannot be decoded" in msg
    assert all(f in msg for f in bad) and "repair or remove them" in msg
    assert not jft.data.image_folder.builder(str(root), cfg["data_dir"]).is_prepared()
    for rel in bad:  # repaired: prepared and read
        os.remove(root / rel)
    assert jft.data.info(cfg).num_classes == 3


def test_one_class_is_refused_with_one_line(tmp_path, data_dir):
    root = _image_folder(tmp_path / "imgs", ["only"])
    cfg = {"name": "image_folder", "path": str(root), "data_dir": str(tmp_path / "d")}
    cfg["eval_split"] = "validation"
    with pytest.raises(jft.data.DataError, match=r"has one class \(only\): a classifier"):
        jft.data.info(cfg)
    with pytest.raises(jft.data.DataError, match=r"keep_classes=\(5,\) keeps one class"):
        jft.data.info({"name": "digits", "keep_classes": (5,)})
    # Through the command: one line, before anything is compiled or written.
    workdir = tmp_path / "run"
    rc, stdout, lines, _ = _jft(data_dir, workdir, "--config.data.keep_classes=(5,)")
    _assert_one_line_error(rc, stdout, lines, "keep_classes=(5,) keeps one class")
    assert not workdir.exists() or os.listdir(workdir) == []


def test_download_offline_fails_within_seconds(tmp_path, monkeypatch):
    # Once: 209 s of retries, then a traceback. TEST-NET-1 (RFC 5737) never answers, so
    # this runs the same offline or online, and never touches the network.
    monkeypatch.setenv("JFT_DOWNLOAD_PROBE", "192.0.2.1:443")
    t0 = time.perf_counter()
    with pytest.raises(jft.data.DataError) as e:
        jft.data.info({"name": "mnist", "download": True, "data_dir": str(tmp_path)})
    # The fault was 209 s of retries (sleeping, so wall time); the bound leaves a loaded
    # machine its pace.
    assert time.perf_counter() - t0 < 60
    msg = str(e.value)
    assert "\n" not in msg and "'mnist'" in msg and "192.0.2.1:443 cannot be reached" in msg
    assert "tfds build mnist" in msg
