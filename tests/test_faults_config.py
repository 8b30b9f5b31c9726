"""Config mistakes: one line naming the key, before anything is compiled, prepared or written.

Each case runs the library (``jft.train.train_and_evaluate``) and asserts the
ConfigError's one line names the key, that nothing was compiled (JAX's compile
events) and that the workdir is untouched. A handful run the real ``jft train``
command too: exit status 2, the last stderr line names the key, no workdir, and
a time close to a bare ``import jft.train``.
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys

import jax
import ml_collections
import pytest

import jft
from jft.train import config as config_lib

_COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: (
        _COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
    )
)


def _recipe(**overrides):
    """The digits_mlp recipe, tiny, with ``overrides`` ("a.b": value) applied."""
    c = jft.train.default_config()
    c.data.batch_size = 32
    c.model = ml_collections.ConfigDict({"name": "mlp", "widths": (8,)})
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "lr": 1e-2})
    c.num_steps = 4
    c.log_every = 2
    c.eval_every = 2
    c.checkpoint.every = 2
    c.progress = False
    for key, value in overrides.items():
        group, _, leaf = key.rpartition(".")
        node = c
        for part in group.split(".") if group else ():
            node = node[part]
        if isinstance(node, ml_collections.ConfigDict) and leaf not in node:
            with node.unlocked():
                node[leaf] = value
        else:
            node[leaf] = value
    return c


@pytest.fixture(autouse=True, scope="module")
def _data_dir(tmp_path_factory):
    old = os.environ.get("JFT_DATA_DIR")
    os.environ["JFT_DATA_DIR"] = str(tmp_path_factory.mktemp("tfds"))
    yield
    if old is None:
        os.environ.pop("JFT_DATA_DIR")
    else:
        os.environ["JFT_DATA_DIR"] = old


def _snapshot(path):
    """Every entry under ``path``; files with their size and mtime (None: no ``path``).

    Folders are listed without their mtime: the workdir lock and the writability
    probe create and remove a file, which touches the folder's mtime only.
    """
    if not os.path.exists(path):
        return None
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), path)] = "dir"
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), path)] = (st.st_size, st.st_mtime_ns)
    return out


def _refused(config, workdir, *fragments):
    """train_and_evaluate raises one line naming ``fragments``; nothing compiled or written."""
    before = _snapshot(workdir)
    _COMPILES.clear()
    with pytest.raises(jft.errors.JftError) as e:
        jft.train.train_and_evaluate(config, workdir)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert not _COMPILES, f"compiled before failing: {msg}"
    after = _snapshot(workdir)
    if before is None:  # the lock may create the folder; it leaves nothing in it
        assert not after, after
    else:
        assert after == before
    return msg


# Mistakes in the config alone: found by resolve(), before the workdir exists.
CASES = {
    "lr_negative": ({"optimizer.lr": -1.0}, ["'optimizer.lr'", "-1.0"]),
    "lr_nan": ({"optimizer.lr": math.nan}, ["'optimizer.lr'", "nan"]),
    "lr_inf": ({"optimizer.lr": math.inf}, ["'optimizer.lr'", "inf"]),
    "lr_negative_with_schedule": (
        {"optimizer.lr": -1.0, "schedule.name": "warmup_cosine"},
        ["'optimizer.lr'"],
    ),
    "unknown_loss": ({"loss.name": "hinge"}, ["'loss.name'", "'hinge'", "softmax_xent"]),
    "log_every_0": ({"log_every": 0}, ["'log_every'", ">= 1"]),
    "grad_accum_0": ({"grad_accum_steps": 0}, ["'grad_accum_steps'", ">= 1"]),
    "grad_accum_not_dividing": (
        {"grad_accum_steps": 3},
        ["'grad_accum_steps'", "data.batch_size=32"],
    ),
    "num_workers_negative": ({"data.num_workers": -1}, ["'data.num_workers'"]),
    "prefetch_0": ({"data.prefetch": 0}, ["'data.prefetch'"]),
    "batch_size_0": ({"data.batch_size": 0}, ["config.data.batch_size"]),
    "heavy_ball_momentum_1.5": (
        {"optimizer.name": "heavy_ball", "optimizer.momentum": 1.5},
        ["'optimizer.momentum'", "[0, 1)", "1.5"],
    ),
    "adam_b1_1.0": ({"optimizer.b1": 1.0}, ["'optimizer.b1'", "[0, 1)"]),
    "adam_eps_negative": ({"optimizer.eps": -1e-8}, ["'optimizer.eps'"]),
    "unknown_optimizer_argument": (
        {"optimizer.name": "heavy_ball", "optimizer.beta": 0.5},
        ["'optimizer.beta'", "heavy_ball", "momentum", "nesterov"],
    ),
    "eval_every_negative": ({"eval_every": -1}, ["'eval_every'", ">= 0"]),
    "checkpoint_every_negative": ({"checkpoint.every": -5}, ["'checkpoint.every'"]),
    "checkpoint_keep_0": ({"checkpoint.keep": 0}, ["'checkpoint.keep'"]),
    "warmup_negative": ({"schedule.warmup_steps": -1}, ["'schedule.warmup_steps'"]),
    "label_smoothing_2": ({"loss.label_smoothing": 2.0}, ["'loss.label_smoothing'", "[0, 1)"]),
    "label_smoothing_1": ({"loss.label_smoothing": 1.0}, ["'loss.label_smoothing'"]),
    "best_metric_unknown": (
        {"checkpoint.best_metric": "eval/nosuch"},
        ["'checkpoint.best_metric'", "eval/nosuch", "eval/accuracy", "eval/loss"],
    ),
    "clip_negative": ({"clip_grad_norm": -1.0}, ["'clip_grad_norm'", ">= 0"]),
    "clip_nan": ({"clip_grad_norm": math.nan}, ["'clip_grad_norm'"]),
    "max_nonfinite_0": ({"max_nonfinite_steps": 0}, ["'max_nonfinite_steps'", ">= 1"]),
    "frozen_bad_regex": ({"frozen": ("(",)}, ["'frozen'", "'('"]),
    "num_steps_0": ({"num_steps": 0}, ["'num_steps'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_mistake_is_one_line_before_anything_runs(case, tmp_path):
    overrides, fragments = CASES[case]
    workdir = tmp_path / "run"
    _refused(_recipe(**overrides), workdir, *fragments)
    assert not workdir.exists()
    with pytest.raises(jft.errors.JftError):  # resolve() alone finds it: no data, no model
        config_lib.resolve(_recipe(**overrides))


def test_an_override_may_set_any_argument_of_the_chosen_rule():
    c = config_lib.resolve(_recipe(**{"optimizer.name": "heavy_ball", "optimizer.momentum": 0.5}))
    assert c.optimizer.momentum == 0.5
    c = config_lib.resolve(_recipe(**{"optimizer.name": "rmsprop", "optimizer.decay": 0.9}))
    assert c.optimizer.decay == 0.9


def test_a_mistake_in_a_later_stage_fails_before_the_first_stage_runs(tmp_path):
    config = ml_collections.ConfigDict(
        {
            "stages": ("a", "b"),
            "a": _recipe().to_dict(),
            "b": _recipe(**{"optimizer.lr": -1.0, "init.path": "stage:a"}).to_dict(),
        }
    )
    _refused(config, tmp_path / "run", "stage 'b'", "'optimizer.lr'")
    assert not (tmp_path / "run" / "a").exists()
    config.b = _recipe(**{"init.path": "stage:c"}).to_dict()
    _refused(config, tmp_path / "run", "config.b.init.path", "'c'")


# Mistakes that need the data set's size, the model's parameters or the workdir:
# found once the data source is open, before anything is compiled.


def test_batch_larger_than_the_split(tmp_path):
    msg = _refused(_recipe(**{"data.batch_size": 4096}), tmp_path / "run", "'data.batch_size'")
    assert "4096" in msg and "examples" in msg


def test_everything_frozen_says_nothing_left_to_train(tmp_path):
    _refused(_recipe(frozen=(".*",)), tmp_path / "run", "'frozen'", "nothing left to train")


def test_frozen_rule_that_matches_nothing(tmp_path):
    _refused(_recipe(frozen=("encoder/.*",)), tmp_path / "run", "'frozen'", "matches no")


def test_best_metric_top5_with_fewer_classes(tmp_path):
    config = _recipe(**{"checkpoint.best_metric": "eval/top_5", "data.keep_classes": (0, 1, 2)})
    _refused(config, tmp_path / "run", "'checkpoint.best_metric'", "3 classes")


def test_num_steps_below_an_existing_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    # check_run reads only the step folders' names, so empty ones stand for a
    # run that checkpointed steps 2 and 4 (test_resume covers real resumes).
    for step in ("2", "4"):
        (workdir / "checkpoints" / step).mkdir(parents=True)
    msg = _refused(_recipe(num_steps=3), workdir, "'num_steps'", "step 4", "new workdir")
    assert str(workdir) in msg


# The real command: exit 2, the last line names the key, nothing written, fast.


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1")
    env.pop("XLA_FLAGS", None)
    env.pop("JFT_DEBUG", None)
    t0 = _children_cpu_seconds()
    out = subprocess.run(
        [sys.executable, "-m", "jft.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    return out, _children_cpu_seconds() - t0


def _children_cpu_seconds() -> float:
    # CPU seconds of the finished subprocesses: a loaded machine does not inflate them
    # as it does wall time.
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@pytest.fixture(scope="module")
def import_seconds():
    """The CPU seconds of a bare ``import jft.train`` in a fresh interpreter."""
    t0 = _children_cpu_seconds()
    subprocess.run([sys.executable, "-c", "import jft.train"], check=True, timeout=300)
    return _children_cpu_seconds() - t0


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--config.optimizer.lr=-1"], ["'optimizer.lr'"]),
        (["--config.max_nonfinite_steps=0"], ["'max_nonfinite_steps'"]),
        (
            ["--config.optimizer.name=heavy_ball", "--config.optimizer.momentum=1.5"],
            ["'optimizer.momentum'", "[0, 1)"],
        ),
    ],
)
def test_command_config_mistake_is_the_last_line_exit_2_fast(
    args, fragments, tmp_path, import_seconds
):
    workdir = tmp_path / "run"
    out, seconds = _cli("train", "--config=digits_mlp", f"--workdir={workdir}", *args)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert "Compiling" not in out.stderr, "compiled before failing"
    last = out.stderr.strip().splitlines()[-1]
    for f in fragments:
        assert f in last, (f, last)
    assert not workdir.exists()
    # Parsing the recipe and validating it adds little to importing jft.
    assert seconds < 2 * import_seconds + 5, (seconds, import_seconds)


def test_command_override_sets_an_argument_the_recipe_does_not_name(tmp_path):
    # digits_mlp's optimizer group holds only name and lr.
    override = ["--config.optimizer.name=heavy_ball", "--config.optimizer.momentum=0.5"]
    out, _ = _cli("config", "digits_mlp", *override)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "optimizer.momentum = 0.5  # default: 0.9" in out.stdout.splitlines()


def test_init_weights_with_nan_are_refused_naming_tensor_and_file(tmp_path):
    import numpy as np
    from flax import traverse_util

    model = jft.models.get("mlp", widths=(8,), num_classes=10)
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
    flat = {k: np.array(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
    flat["params/backbone/dense_0/kernel"][3, 2] = np.nan
    weights = tmp_path / "w.npz"
    np.savez(weights, **flat)
    workdir = tmp_path / "run"
    with pytest.raises(jft.weights.WeightsError) as e:
        jft.train.train_and_evaluate(_recipe(**{"init.path": str(weights)}), workdir)
    msg = str(e.value)
    assert "\n" not in msg and str(weights) in msg and "non-finite" in msg
    assert "params/backbone/dense_0/kernel" in msg
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"data.batch_size": 36}, ["'data.batch_size'", "8 devices", "multiple of 8"]),
        ({"data.eval_batch_size": 100}, ["'data.eval_batch_size'", "8 devices"]),
        (
            {"parallel": "pmap", "data.batch_size": 16, "grad_accum_steps": 4},
            ["'grad_accum_steps'", "2 rows per device"],
        ),
    ],
)
def test_batches_that_do_not_divide_among_the_devices(overrides, fragments, tmp_path):
    assert jax.local_device_count() == 8  # conftest's fake CPU devices
    _refused(_recipe(**overrides), tmp_path / "run", *fragments)
