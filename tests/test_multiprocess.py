"""Two real processes (4 CPU devices each, gloo collectives) train as one process with 8 devices.

The two layouts add the same numbers in a different order (gloo's all-reduce
across processes, XLA's within one), so they may differ by rounding and by
nothing else. ``TOLERANCE`` bounds rounding from above and semantic
differences from below:

- Rounding. The run is SGD (lr 0.1, 10 steps; tests/_mp_worker.py says why not
  Adam). A float32 sum of n terms reordered changes by at most (n-1)·u·Σ|terms|
  (u = 2**-24 ≈ 6e-8); for the 32 rows of a batch that is < 2e-6 relative to
  the gradient's scale, and 10 steps of lr 0.1 carry at most 10·0.1 of it into
  the parameters: < 2e-6 relative to their scale (|θ| ≤ ~1 here). Measured:
  perturbing every input by one ulp moves every parameter and statistic by
  ≤ 6e-8 relative.
- Semantics. A missing row, or BatchNorm statistics over half the batch (what a
  per-process BatchNorm would give), moves them by ≥ 2.4e-4 (measured; checked
  below at every run, as negative controls).

So arrays are compared to TOLERANCE relative to max(1, max|want|), 5x above
the rounding bound and 20x below the smallest semantic difference; integer
eval sums (counts, confusion matrix, top-k hits) must be equal.
"""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

pytestmark = pytest.mark.devices(8)  # the reference run: one process with 8 devices

WORKER = Path(__file__).with_name("_mp_worker.py")
_spec = importlib.util.spec_from_file_location("_mp_worker", WORKER)
_mp_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mp_worker)
TIMEOUT_S = 120
TOLERANCE = 1e-5


def flat(state, sums):
    return {
        **traverse_util.flatten_dict({"params": state.params}, sep="/"),
        **traverse_util.flatten_dict({"batch_stats": state.batch_stats}, sep="/"),
        **{f"sums/{k}": np.asarray(v) for k, v in sums.items()},
    }


def scaled_differences(got, want):
    """Each floating array's largest difference over max(1, max|want|)."""
    out = {}
    for k, w in want.items():
        w, g = np.asarray(w), np.asarray(got[k])
        if np.issubdtype(w.dtype, np.floating):
            out[k] = float(np.max(np.abs(g - w))) / max(1.0, float(np.max(np.abs(w))))
    return out


def integer_sums(arrays):
    return {
        k: np.asarray(v).tolist()
        for k, v in arrays.items()
        if not np.issubdtype(np.asarray(v).dtype, np.floating)
    }


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
    mesh = par.make_mesh()
    want = flat(*_mp_worker.run("jit", mesh))
    assert sorted(got) == sorted(want)
    diffs = scaled_differences(got, want)
    worst = max(diffs, key=diffs.get)
    print(f"largest scaled difference, 2 processes x 4 devices vs 1 x 8: {diffs[worst]:.2e}")
    assert diffs[worst] <= TOLERANCE, (worst, diffs[worst])
    assert integer_sums(got) == integer_sums(want)
    assert float(got["sums/count"]) == _mp_worker.EVAL_ROWS

    # Negative controls: semantic differences of the kinds a broken layout makes
    # stay far above TOLERANCE, so the comparison above can see them.
    missing = _mp_worker.global_batches()
    for b in missing:  # row 0 lost (replaced by row 1)
        b["image"][0], b["label"][0] = b["image"][1], b["label"][1]
    controls = {
        "missing row": _mp_worker.run("jit", mesh, batches=missing),
        "BatchNorm over half the batch": _mp_worker.run("jit", mesh, grad_accum_steps=2),
    }
    for name, run in controls.items():
        d = scaled_differences(flat(*run), want)
        smallest = min(v for k, v in d.items() if not k.startswith("sums/"))
        print(f"{name}: every array moves by >= {smallest:.2e}")
        assert smallest >= 20 * TOLERANCE, name
