"""`jft train` on two real processes (4 CPU devices each) equals one process with 8 devices.

The whole loop, not just the step: each process reads its own slice of every
global batch, jit runs over the 8-device global mesh (gloo collectives), orbax
saves from both processes, and only process 0 writes metrics.jsonl and plots.

The run is SGD, not the recipe's Adam: the two layouts differ by the rounding
of their cross-device sums, which SGD carries forward linearly (12 steps of lr
0.1: < 3e-6 relative to the parameters' scale; tests/test_multiprocess.py
derives the bound), while Adam's sign-like first steps can turn rounding noise
into lr-sized differences on one machine and not on another.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

from jft.train import checkpoint as ckpt_lib
from jft.train.logging import read_metrics

ARGS = [
    "--config=digits_mlp",
    "--config.num_steps=12",
    "--config.eval_every=6",
    "--config.log_every=1",
    "--config.checkpoint.every=6",
    "--config.progress=False",
    "--config.data.num_workers=2",
    "--config.optimizer.name=sgd",
    "--config.optimizer.lr=0.1",
]
TOLERANCE = 1e-5  # relative to max(1, max|param|); see the module docstring


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(data_dir, devices, **extra):
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        JFT_DATA_DIR=str(data_dir),
        **extra,
    )
    return env


def test_two_processes_train_like_one_with_8_devices(tmp_path):
    data_dir = tmp_path / "tfds"
    one = tmp_path / "one"
    out = subprocess.run(
        [sys.executable, "-m", "jft.cli", "train", f"--workdir={one}", *ARGS],
        env=_env(data_dir, 8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]

    two = tmp_path / "two"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jft.cli", "train", f"--workdir={two}", *ARGS],
            env=_env(
                data_dir,
                4,
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:  # a hang fails the test instead of blocking it
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    assert "eval/accuracy" in logs[0] and "eval/accuracy" not in logs[1]  # process 0 reports

    want, got = ckpt_lib.read_params(one), ckpt_lib.read_params(two)
    assert sorted(want) == sorted(got)
    for k in want:
        scale = max(1.0, float(np.max(np.abs(want[k]))))
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=TOLERANCE * scale, err_msg=k)
    steps = [r["step"] for r in read_metrics(two / "metrics.jsonl")]
    assert steps == list(range(1, 13))  # one writer: no step twice
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert abs(a[-1]["eval/accuracy"] - b[-1]["eval/accuracy"]) < 1e-6
    assert (two / "plots" / "loss.png").exists()
