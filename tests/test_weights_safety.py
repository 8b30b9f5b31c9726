"""Pickled code is refused without running; bad files and misfits give one-line errors."""

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
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


# Headers that lie: every field is checked against the file before anything is read.


def _raw_safetensors(path, header, data=b"\0" * 16):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize(
    "entry, fragment",
    [
        # begin < 0: the "tensor" would be the last 8 bytes of the header
        ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "offsets [-8, 0]"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "offsets [8, 0]"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 24]}, "truncated"),
        # 2**32 * 2**32 * 4 bytes wraps to 0 in int64: it must not pass as 0 bytes
        ({"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}, "shape [4294967296"),
        ({"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}, "shape [-1, 2]"),
        ({"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}, "shape [-2, -1]"),
        ({"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}, "shape [1.5]"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "needs 12 bytes"),
        ({"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}, "dtype 'Q7'"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, "data_offsets"),
        ({"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}, "shape"),
        ("oops", "entry"),
    ],
)
def test_safetensors_header_fields_are_checked(tmp_path, entry, fragment):
    path = _raw_safetensors(tmp_path / "w.safetensors", {"t.weight": entry})
    msg = _one_line_error(path, fragment)
    if isinstance(entry, dict):
        assert "t.weight" in msg


def test_safetensors_header_length_is_checked(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    _one_line_error(path, "header claims")
    path.write_bytes(struct.pack("<Q", 0) + b"{}")
    _one_line_error(path, "header")


def test_good_raw_safetensors_still_reads(tmp_path):
    data = np.arange(4, dtype=np.float32).tobytes()
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2, 0], "data_offsets": [8, 8]},
        "c": {"dtype": "F32", "shape": [], "data_offsets": [8, 12]},
    }
    flat = jft.weights.read(_raw_safetensors(tmp_path / "w.safetensors", header, data))
    np.testing.assert_array_equal(flat["a"], [0, 1])
    assert flat["b"].shape == (2, 0) and flat["c"].shape == () and flat["c"] == 2


def _npz_with_header(path, shape, data=b"\0" * 16):
    """An npz whose one member's .npy header claims ``shape`` over ``data``."""
    buf = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("w.npy", buf.getvalue() + data)
    return path


@pytest.mark.parametrize("shape", [(2**32, 2**32), (1000, 1000), (3,)])
def test_npz_header_that_lies_about_the_size(tmp_path, shape):
    path = _npz_with_header(tmp_path / "w.npz", shape)
    _one_line_error(path, "'w'", f"shape {shape}")


def test_h5_dataset_larger_than_its_storage(tmp_path):
    import h5py

    path = tmp_path / "w.weights.h5"
    with h5py.File(path, "w") as f:
        # declared 4 TB, nothing stored: reading it would allocate 4 TB
        f.create_dataset("layers/dense/vars/0", shape=(2**20, 2**20), dtype="f4")
    _one_line_error(path, "layers/dense/vars/0", "stores")


def test_h5_links_and_storage_outside_the_file_are_refused(tmp_path):
    import h5py

    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    path = tmp_path / "ext.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "layers/dense/vars/0", shape=(4,), dtype="<f4", external=[(str(outside), 0, 16)]
        )
    _one_line_error(path, "layers/dense/vars/0", "outside")

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.ones(3, np.float32)
    path = tmp_path / "link.weights.h5"
    with h5py.File(path, "w") as f:
        f["layers/dense/vars/0"] = h5py.ExternalLink(str(other), "/x")
    _one_line_error(path, "layers/dense/vars/0", "outside")


def test_h5_layer_names_that_do_not_exist(tmp_path):
    import h5py

    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense", b"ghost"]
        f.create_group("dense").attrs["weight_names"] = [b"dense/kernel:0"]
        f["dense/dense/kernel:0"] = np.ones((2, 2), np.float32)
    _one_line_error(path, "ghost")


def _hf_folder(folder, shard_name):
    folder.mkdir()
    safetensors.torch.save_file({"a": torch.ones(2)}, str(folder / "model-1.safetensors"))
    index = {"weight_map": {"a": "model-1.safetensors", "b": shard_name}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("shard", ["../../../../etc/hostname", "/etc/hostname", "../w.safetensors"])
def test_shard_index_cannot_name_a_file_outside_the_folder(tmp_path, shard):
    safetensors.torch.save_file({"b": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    folder = _hf_folder(tmp_path / "model", shard)
    _one_line_error(folder, "outside", shard)


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    target = tmp_path / "elsewhere.safetensors"
    safetensors.torch.save_file({"a": torch.ones(2)}, str(target))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(target)
    _one_line_error(folder, "outside")


def test_hub_cache_snapshot_symlinks_into_blobs_are_read(tmp_path):
    # huggingface_hub's cache: snapshots/<rev>/model.safetensors -> ../../blobs/<sha>
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    safetensors.torch.save_file({"a": torch.ones(2)}, str(repo / "blobs" / "deadbeef"))
    (snap / "model.safetensors").symlink_to("../../blobs/deadbeef")
    assert set(jft.weights.read(snap)) == {"a"}


def test_from_pretrained_config_symlink_out_of_the_folder(tmp_path):
    (tmp_path / "secret.json").write_text('{"model_type": "bert"}')
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(WeightsError, match="outside") as e:
        jft.weights.from_pretrained(folder)
    assert "\n" not in str(e.value)


# Non-finite weights: read() returns them as they are (so `jft inspect` shows the
# file), restore() and everything built on it refuses them, naming the tensor.


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_restore_refuses_non_finite_weights(resnet_setup, bad):
    _, variables = resnet_setup
    flat = _torch_names(variables)
    flat["layer1.0.conv1.weight"] = flat["layer1.0.conv1.weight"].copy()
    flat["layer1.0.conv1.weight"].flat[3] = bad
    with pytest.raises(WeightsError) as e:
        jft.weights.restore(variables, flat, arch="resnet", source="r18.pth")
    msg = str(e.value)
    assert "\n" not in msg and "r18.pth" in msg and "non-finite" in msg
    assert "layer1.0.conv1.weight" in msg and "params/backbone/layer1_0/conv1/kernel" in msg
    # A skipped (new) head may hold anything: it is not loaded.
    flat = _torch_names(variables)
    flat["fc.weight"] = np.full_like(flat["fc.weight"], np.nan)
    _, report = jft.weights.restore(variables, flat, arch="resnet", skip=["head/.*"])
    assert "params/head/kernel" in report.kept


def test_read_keeps_non_finite_values_and_from_pretrained_refuses_them(tmp_path):
    from tests.torch_refs import import_timm

    import_timm()  # first: it makes torchvision (which transformers imports) load
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    hf = transformers.BertModel(cfg)
    folder = tmp_path / "bert"
    hf.save_pretrained(folder)
    flat = jft.weights.read(folder)
    name = next(k for k in flat if k.endswith("attention.self.query.weight"))
    flat = {k: np.array(v) for k, v in flat.items()}
    flat[name][0, 0] = np.nan
    safetensors.numpy.save_file(flat, str(folder / "model.safetensors"))
    assert np.isnan(jft.weights.read(folder)[name][0, 0])  # read() shows the file as it is
    with pytest.raises(WeightsError) as e:
        jft.weights.from_pretrained(folder)
    msg = str(e.value)
    assert "\n" not in msg and name in msg and str(folder) in msg and "non-finite" in msg


def test_convert_refuses_non_finite_weights(tmp_path):
    path = tmp_path / "w.npz"
    np.savez(path, **{"fc.weight": np.array([[np.inf, 0.0]], np.float32)})
    with pytest.raises(WeightsError, match="non-finite") as e:
        jft.weights.convert(path, tmp_path / "out", arch="resnet")
    assert "fc.weight" in str(e.value) and not (tmp_path / "out").exists()


def test_convert_checks_the_destination_and_arch_before_reading(tmp_path):
    src = tmp_path / "w.npz"
    np.savez(src, **{"fc.weight": np.ones((2, 2), np.float32)})
    (tmp_path / "file").write_text("x")
    for dst, fragment in [
        (tmp_path / "file" / "out", "not a folder"),
        ("/sys/jft-convert-test", "cannot write"),  # refused even to root
    ]:
        with pytest.raises(WeightsError, match=fragment) as e:
            jft.weights.convert(src, dst, arch="resnet")
        assert str(dst) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WeightsError, match="unknown arch 'nosucharch'; known: bert") as e:
        jft.weights.convert(src, tmp_path / "out", arch="nosucharch")
    with pytest.raises(WeightsError, match="unknown arch 'nosucharch'"):
        jft.weights.restore({"params": {}}, {}, arch="nosucharch")
    assert sorted(os.listdir(tmp_path)) == ["file", "w.npz"]


def test_jft_named_weights_refuse_another_arch(tmp_path, resnet_setup):
    from flax import traverse_util

    _, variables = resnet_setup
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
    path = tmp_path / "w.npz"
    np.savez(path, **flat)
    for arch in ("vgg", "resnet"):
        with pytest.raises(WeightsError, match="named by jft paths") as e:
            jft.weights.convert(path, tmp_path / "out", arch=arch)
        assert f"arch={arch!r}" in str(e.value) and "arch='jft'" in str(e.value)
        with pytest.raises(WeightsError, match="named by jft paths"):
            jft.weights.restore(variables, flat, arch=arch)
    assert not (tmp_path / "out").exists()
    restored, _ = jft.weights.restore(variables, flat, arch="jft")
    np.testing.assert_array_equal(
        restored["params"]["head"]["kernel"], variables["params"]["head"]["kernel"]
    )


def test_torch_storage_larger_than_its_record(tmp_path):
    # torch.load(mmap=True) would read the missing 56 bytes from whatever follows.
    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(16, dtype=torch.float32)}, good)
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, data[:8] if info.filename.endswith("data/0") else data)
    _one_line_error(bad, "storage 0", "needs 64 bytes", "holds 8")
    np.testing.assert_array_equal(jft.weights.read(good)["w"], np.arange(16))
