"""Two real processes (4 CPU devices each, gloo collectives) train as one process with 8 devices."""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

WORKER = Path(__file__).with_name("_mp_worker.py")
_spec = importlib.util.spec_from_file_location("_mp_worker", WORKER)
_mp_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mp_worker)
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_8_devices(tmp_path):
    out = tmp_path / "params.npz"
    port = free_port()
    procs = []
    for i in range(2):
        env = {
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "JAX_PLATFORMS": "cpu",
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(i),
            "PYTHONPATH": os.pathsep.join(
                [str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")]
            ),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:  # a hang fails the test instead of blocking it
            if p.poll() is None:
                p.kill()
                p.communicate()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:] if i < len(logs) else ''}"
    got = dict(np.load(out))

    from jft.train import parallel as par

    assert jax.device_count() == 8
    state, sums = _mp_worker.run("jit", par.make_mesh())
    want = {
        **traverse_util.flatten_dict({"params": state.params}, sep="/"),
        **traverse_util.flatten_dict({"batch_stats": state.batch_stats}, sep="/"),
        **{f"sums/{k}": v for k, v in sums.items()},
    }
    assert sorted(got) == sorted(want)
    worst = max(float(np.max(np.abs(got[k] - np.asarray(want[k])))) for k in want)
    print(f"largest difference, 2 processes x 4 devices vs 1 x 8: {worst:.2e}")
    assert worst <= 1e-5
    assert float(got["sums/count"]) == _mp_worker.EVAL_ROWS
