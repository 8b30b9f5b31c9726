"""Pickled code is refused without running; bad files and misfits give one-line errors."""

import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

import jft.models
import jft.weights
from jft.weights import WeightsError


class _Payload:
    """Unpickling this runs ``touch <marker>``, as a malicious checkpoint would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line_error(path, *fragments) -> str:
    with pytest.raises(WeightsError) as e:
        jft.weights.read(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


@pytest.mark.parametrize("container", ["torch-zip", "plain-pickle"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"fc.weight": torch.zeros(2, 2), "x": _Payload(marker)}
    if container == "torch-zip":
        torch.save(payload, path)
    else:
        # A plain pickle (the legacy torch.save layout), without tensors, so
        # that os.system is the first global the unpickler meets.
        payload["fc.weight"] = [0.0, 1.0]
        path.write_bytes(pickle.dumps(payload, protocol=2))

    msg = _one_line_error(path, "refused", "safetensors")
    assert "system" in msg  # names the global it refused
    assert not marker.exists(), "the pickled payload ran"

    # The payload is real: an unsafe load in a child process does run it.
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True)
    assert marker.exists()


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, a=np.array([{"x": 1}], dtype=object))
    _one_line_error(path, "refused", "pickled")


def test_missing_file_and_unknown_extension(tmp_path):
    _one_line_error(tmp_path / "nope.safetensors", "no such file")
    (tmp_path / "w.txt").write_text("hello")
    _one_line_error(tmp_path / "w.txt", "unknown extension .txt", ".safetensors")
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", "not a Hugging Face model folder")


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_files(tmp_path):
    sd = {"a.weight": torch.randn(64, 64), "b.weight": torch.randn(64, 64)}
    st = tmp_path / "w.safetensors"
    safetensors.torch.save_file(sd, str(st))
    _truncate(st)
    _one_line_error(st, "truncated", "a.weight")

    pth = tmp_path / "w.pth"
    torch.save(sd, pth)
    _truncate(pth)
    _one_line_error(pth, "truncated or corrupt PyTorch file")

    npz = tmp_path / "w.npz"
    np.savez(npz, **{k: v.numpy() for k, v in sd.items()})
    _truncate(npz)
    _one_line_error(npz, "truncated")

    import h5py

    h5 = tmp_path / "w.weights.h5"
    with h5py.File(h5, "w") as f:
        f["layers/dense/vars/0"] = np.ones((256, 256), np.float32)
    _truncate(h5, 0.3)
    _one_line_error(h5, "truncated")


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("w.safetensors", "not a safetensors file"),
        ("w.pth", "not a PyTorch weights file"),
        ("w.npz", "not an npz file"),
        ("w.h5", "not an HDF5 file"),
    ],
)
def test_files_that_are_not_weights(tmp_path, name, fragment):
    path = tmp_path / name
    path.write_text("these are not the weights you are looking for\n" * 20)
    _one_line_error(path, fragment)


def test_torch_file_without_tensors(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    _one_line_error(path, "holds no tensors")


def test_missing_torch_names_the_package(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(1)}, path)
    monkeypatch.setitem(sys.modules, "torch", None)
    _one_line_error(path, "needs the torch package", "pip install torch")


@pytest.fixture(scope="module")
def resnet_setup():
    # A small ResNet: the key map does not care about widths.
    model = jft.models.get("resnet", stage_sizes=(1, 1), width=8, stem_width=8, num_classes=3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return model, variables


def _torch_names(variables):
    """The torchvision names of a jft ResNet's variables (inverse of the key map)."""
    from flax import traverse_util

    out = {}
    for path, v in traverse_util.flatten_dict(variables, sep="/").items():
        coll, _, module_leaf = path.partition("/")
        module, _, leaf = module_leaf.removeprefix("backbone/").rpartition("/")
        module = module.replace("downsample_conv", "downsample.0").replace(
            "downsample_bn", "downsample.1"
        )
        module = module.replace("_", ".").replace("/", ".").replace("head", "fc")
        v = np.asarray(v)
        name = {"scale": "weight", "mean": "running_mean", "var": "running_var"}.get(leaf, leaf)
        if leaf == "kernel":
            v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
            name = "weight"
        out[f"{module}.{name}"] = v
    return out


def test_wrong_arch_is_one_line(resnet_setup):
    _, variables = resnet_setup
    flat = _torch_names(variables)
    _, report = jft.weights.restore(variables, flat, arch="resnet")  # the right arch works
    assert not report.kept and not report.unused
    with pytest.raises(WeightsError) as e:
        jft.weights.restore(variables, flat, arch="vgg")
    msg = str(e.value)
    assert "\n" not in msg and "arch='vgg'" in msg and "is arch right" in msg


def test_head_mismatch_without_skip_is_one_line(resnet_setup):
    model, variables = resnet_setup
    flat = _torch_names(variables)
    flat["fc.weight"] = np.zeros((10, flat["fc.weight"].shape[1]), np.float32)
    flat["fc.bias"] = np.zeros(10, np.float32)
    with pytest.raises(WeightsError) as e:
        jft.weights.restore(variables, flat, arch="resnet")
    msg = str(e.value)
    assert "\n" not in msg and "shape mismatch" in msg and "params/head/kernel" in msg
    assert "file (16, 10) vs model (16, 3)" in msg
    # With skip, the new head keeps its init.
    _, report = jft.weights.restore(variables, flat, arch="resnet", skip=["head/.*"])
    assert set(report.kept) == {"params/head/kernel", "params/head/bias"}
    del model
