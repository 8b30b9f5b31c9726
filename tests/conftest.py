"""Test set-up: 8 fake CPU devices, created before JAX starts, unless a platform is asked for.

By default the suite runs on the CPU with 8 fake devices
(``--xla_force_host_platform_device_count=8``), so every parallel path (jit over a
mesh, pmap, FSDP) runs against one device on any machine. On an accelerator, run
it with ``JAX_PLATFORMS=cuda`` (or ``tpu``): then the real devices are used, and a
test marked ``@pytest.mark.devices(n)`` that needs more devices than there are
is not run, with the reason. On the CPU no test is ever left out for it.
"""

import atexit
import os
import shutil
import tempfile

import pytest

if not os.environ.get("JAX_PLATFORMS"):
    os.environ["JAX_PLATFORMS"] = "cpu"
# The device count is set here unless the caller set one (to try fewer devices).
FAKE_DEVICES = os.environ["JAX_PLATFORMS"] == "cpu" and (
    "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
)
if FAKE_DEVICES:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KERAS_BACKEND", "jax")
# XLA's compiled programs go to an on-disk cache for this session (one per xdist
# worker), shared with the `jft train` processes the tests start: many tests compile
# the same program (a recipe's step, a model's forward), and a hit skips XLA's work.
# A hit is the program compiled before, so no number depends on it. The size cap turns
# on jax's file lock, so two processes compiling at once do not read a half-written entry.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="jft-tests-xla-cache-")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax

CPU_DEVICES = 8


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "devices(n): the test needs n devices (a mesh or pmap of that size)"
    )
    if FAKE_DEVICES:
        # The fake devices must have taken: on the CPU every multi-device test runs.
        assert jax.device_count() >= CPU_DEVICES, (
            f"expected {CPU_DEVICES} fake CPU devices, got {jax.devices()}: was jax imported "
            "before tests/conftest.py set XLA_FLAGS?"
        )


def pytest_runtest_setup(item):
    for mark in item.iter_markers(name="devices"):
        need, have = mark.args[0], jax.device_count()
        if have < need:
            pytest.skip(
                f"needs {need} devices and {jax.default_backend()} has {have}; "
                f"with JAX_PLATFORMS and XLA_FLAGS unset the suite makes {CPU_DEVICES} fake CPUs"
            )
