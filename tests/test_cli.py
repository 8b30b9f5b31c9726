"""The ``jft`` command: help, one-line errors for user mistakes, eval, inspect, convert."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

STEPS = 6


def _env(data_dir):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JFT_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu")
    return env


def _jft(*args, data_dir, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "jft.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(data_dir),
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("cli") / "run"
    out = _jft(
        "train",
        "--config=digits_mlp",
        f"--workdir={workdir}",
        f"--config.num_steps={STEPS}",
        "--config.eval_every=3",
        "--config.checkpoint.every=3",
        "--config.progress=False",
        data_dir=data_dir,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval/accuracy" in out.stdout
    return workdir


def test_console_script_prints_help():
    exe = shutil.which("jft")
    assert exe is not None, "the jft console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("train", "eval", "convert", "inspect"):
        assert command in out.stdout


def test_unknown_command_is_a_one_line_error():
    out = subprocess.run(
        [sys.executable, "-m", "jft.cli", "nonsense"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config=digits_mlp", "--config.optimizer.lrr=0.1"], "optimizer.lrr"),
        (["--config=digits_mlp", "--config.nonsense=1"], "nonsense"),
        (["--config=digits_mlp", "--config.num_steps=abc"], "num_steps"),
        (["--config=configs/no_such_recipe.py"], "no_such_recipe"),
        (["--config=digits_mlp", "--config.data.name=mnist"], "mnist"),
        (["--config=digits_mlp", "--config.optimizer.name=adamx"], "adamx"),
        (["--config=digits_mlp", "--config.model.name=resnet9"], "resnet9"),
        (["--config=cifar10_resnet18_finetune"], "init.path"),
        (["--config=digits_mlp", "--config.init.path=/no/such/weights.pth"], "weights.pth"),
    ],
)
def test_user_mistakes_are_one_line_errors(args, needle, data_dir, tmp_path):
    out = _jft("train", *args, f"--workdir={tmp_path / 'w'}", data_dir=data_dir, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("jft train: error:") and needle in lines[0], lines[0]


def test_eval_reports_the_trained_runs_metrics(run_dir, data_dir):
    out = _jft("eval", f"--workdir={run_dir}", data_dir=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "accuracy" in out.stdout and f"step  {STEPS}".replace("  ", " ") in " ".join(
        out.stdout.split()
    )
    assert "confusion matrix" in out.stdout


def test_inspect_lists_a_checkpoint_with_frozen_status(run_dir, data_dir, tmp_path):
    out = _jft("inspect", str(run_dir), data_dir=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "backbone/dense_0/kernel" in out.stdout and "64x128" in out.stdout
    recipe = tmp_path / "frozen.py"
    recipe.write_text(
        "from jft.train import default_config\n"
        "def get_config(arg=None):\n"
        "    c = default_config()\n"
        "    c.frozen = ('backbone/.*',)\n"
        "    return c\n"
    )
    out = _jft("inspect", str(run_dir), f"--config={recipe}", data_dir=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {ln.split()[0]: ln.split()[-1] for ln in out.stdout.splitlines() if "/" in ln}
    assert any(k.endswith("backbone/dense_0/kernel") and v == "frozen" for k, v in rows.items())
    assert any(k.endswith("head/kernel") and v == "trainable" for k, v in rows.items())


def test_export_then_convert_and_inspect_the_weights(run_dir, data_dir, tmp_path):
    import jft

    dst = tmp_path / "params.safetensors"
    jft.train.export(run_dir, dst)
    out = _jft("inspect", str(dst), data_dir=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "params/head/kernel" in out.stdout
    out = _jft("convert", str(dst), str(tmp_path / "ckpt"), "--arch=jft", data_dir=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    again = _jft("convert", str(dst), str(tmp_path / "ckpt"), "--arch=jft", data_dir=data_dir)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr
