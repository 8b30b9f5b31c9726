"""Exact resume: SIGKILL a real ``jft train`` process anywhere, run it again, lose nothing.

Each run is the real command (``python -m jft.cli train``) in a subprocess on the
offline digits data, with asynchronous orbax checkpoints every 4 steps. The
killed-and-resumed run must end with every array of its final state (parameters,
optimizer state) bitwise equal to an uninterrupted run's, and a ``metrics.jsonl``
with every step once and the same losses bit for bit. So must a LoRA run
(issue 17), whose checkpoints hold the adapters and the new head but not the
frozen base (the uninterrupted full run, which it fine-tunes on other classes).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jft.train import checkpoint as ckpt_lib

STEPS = 24
RECIPE = """
import ml_collections
from jft.train import default_config

def get_config(arg=None):
    c = default_config()
    c.data.name = "digits"
    c.data.keep_classes = (0, 1, 2, 3, 4)
    c.data.batch_size = 32
    c.model = ml_collections.ConfigDict({"name": "cnn", "widths": WIDTHS, "num_classes": 5})
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "lr": 3e-3})
    c.schedule.name = "cosine"
    c.num_steps = STEPS
    c.log_every = 1
    c.eval_every = 16
    c.parallel = "none"
    c.progress = False
    c.checkpoint.every = 4
    c.checkpoint.keep = 2
    return c
"""
LORA = """
    c.data.keep_classes = (5, 6, 7, 8, 9)
    c.init.path = BASE
    c.init.skip = ("head/.*",)
    c.lora.targets = (r"backbone/conv\\d",)
    c.lora.rank = 2
    c.lora.alpha = 4.0
    c.lora.modules_to_save = ("head",)
    return c
"""


def _env(data_dir):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device per run
    env.update(JFT_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return env


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "tiny.py"
    path.write_text(RECIPE.replace("WIDTHS", "(8, 16)").replace("STEPS", str(STEPS)))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _cmd(recipe, workdir, *extra):
    return [
        sys.executable,
        "-m",
        "jft.cli",
        "train",
        f"--config={recipe}",
        f"--workdir={workdir}",
        *extra,
    ]


def _spawn(recipe, workdir, data_dir, stdout):
    """``jft train`` started in the background, stderr captured."""
    return subprocess.Popen(
        _cmd(recipe, workdir),
        env=_env(data_dir),
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(recipe, workdir, data_dir, *extra, timeout=300):
    out = subprocess.run(
        _cmd(recipe, workdir, *extra),
        env=_env(data_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError):
                pass
    return out


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(recipe, data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ref") / "run"
    _run(recipe, workdir, data_dir)
    return workdir


@pytest.fixture(scope="module")
def lora_recipe(reference, tmp_path_factory):
    """LoRA on the reference run's convolutions, a new head for the other five digits."""
    path = tmp_path_factory.mktemp("recipes") / "tiny_lora.py"
    body = RECIPE.replace("WIDTHS", "(8, 16)").replace("STEPS", str(STEPS))
    path.write_text(body.replace("    return c\n", LORA.replace("BASE", repr(str(reference)))))
    return path


@pytest.fixture(scope="module")
def lora_reference(lora_recipe, data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora_ref") / "run"
    _run(lora_recipe, workdir, data_dir)
    return workdir


def _final_arrays(workdir):
    """Every array of the final step's saved state (parameters, optimizer state, step), by path."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(workdir, "checkpoints", str(STEPS), "state"))
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _assert_same_run(workdir, reference):
    for got, want in (
        (ckpt_lib.read_params(workdir), ckpt_lib.read_params(reference)),
        (_final_arrays(workdir), _final_arrays(reference)),
    ):
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # bitwise
    steps = _steps(workdir)
    assert steps == list(range(1, STEPS + 1)), f"steps missing or repeated: {steps}"
    for a, b in zip(_records(workdir), _records(reference), strict=True):
        assert a == b, (a, b)


def _wait_until(pred, proc, timeout=240):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            return False
        if time.time() - t0 > timeout:
            raise TimeoutError("the training process made no progress")
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_sigkill_at_random_moments_resumes_bitwise(kind, data_dir, request, tmp_path):
    recipe = request.getfixturevalue("recipe" if kind == "full" else "lora_recipe")
    reference = request.getfixturevalue("reference" if kind == "full" else "lora_reference")
    rng = random.Random(0 if kind == "full" else 1)
    workdir = tmp_path / "killed"
    ckdir = workdir / "checkpoints"
    # One kill per case (each process costs seconds of start-up): the full run's anywhere
    # in a step, the LoRA run's during an asynchronous save of its adapter-only checkpoint.
    # By step, so it lands mid-run however fast the machine is.
    target = rng.randrange(3, STEPS - 4)
    proc = _spawn(recipe, workdir, data_dir, subprocess.DEVNULL)

    def saving():
        return ckdir.exists() and any("tmp" in p.name for p in ckdir.iterdir())

    _wait_until(lambda: max(_steps(workdir), default=0) >= target, proc)
    if kind == "lora":
        _wait_until(saving, proc)
    else:
        time.sleep(rng.uniform(0.0, 0.05))
    assert proc.poll() is None, f"the run ended before the kill at step {target}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    print(f"{kind}: SIGKILL at step {max(_steps(workdir))} (target {target})")
    if kind == "full":
        # And once in the window after the final checkpoint, before the run ends (closing
        # the checkpointer, plots, the summary): the rerun once logged the last step twice.
        proc = _spawn(recipe, workdir, data_dir, subprocess.DEVNULL)
        assert _wait_until((ckdir / str(STEPS)).exists, proc), proc.stderr.read()[-3000:]
        assert proc.poll() is None, "the run ended before the kill in its final window"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _run(recipe, workdir, data_dir)  # the same command again finishes the run
    _assert_same_run(workdir, reference)
    if kind == "lora":  # adapter-only checkpoints: no frozen array, the base named instead
        for step in ckpt_lib.read_metadata(ckdir).steps:
            meta = ckpt_lib.read_metadata(ckdir, step=step)
            assert not [p for p in meta.arrays if p.startswith("frozen/")], step
            assert any(p.endswith("lora_B") for p in meta.arrays)
            assert meta.base["path"] == str(request.getfixturevalue("reference"))
        assert "params/backbone/conv1/kernel" in ckpt_lib.read_params(workdir)  # from the base


def test_sigterm_saves_and_exits_cleanly(recipe, data_dir, reference, tmp_path):
    workdir = tmp_path / "term"
    proc = _spawn(recipe, workdir, data_dir, subprocess.PIPE)
    _wait_until(lambda: len(_steps(workdir)) >= 10, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    stopped = max(_steps(workdir))
    assert stopped < STEPS
    assert "SIGTERM" in out
    ck = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), every=0)
    assert ck.latest_step() == stopped  # saved at the step it stopped, not only at the last every=4
    ck.close()
    _run(recipe, workdir, data_dir)
    _assert_same_run(workdir, reference)


def test_mismatched_workdir_is_a_clear_error_and_nothing_changes(reference, data_dir, tmp_path):
    workdir = reference  # a finished run's folder, which the failed start must leave as it was
    other = tmp_path / "wide.py"
    other.write_text(RECIPE.replace("WIDTHS", "(8, 32)").replace("STEPS", str(STEPS)))

    def listing():
        return sorted(
            (str(p.relative_to(workdir)), p.stat().st_mtime_ns, p.stat().st_size)
            for p in workdir.rglob("*")
        )

    before = listing()
    out = subprocess.run(
        _cmd(other, workdir), env=_env(data_dir), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert "backbone/conv2/kernel" in lines[0]
    assert "16" in lines[0] and "32" in lines[0]
    assert listing() == before
