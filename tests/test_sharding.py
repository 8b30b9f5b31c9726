"""jft.weights.sharding.place: a memory-mapped tensor read shard by shard onto a mesh."""

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import jft.weights
from jft.weights import sharding
from jft.weights.restore import WeightsError


def _file_rss(path: str) -> int:
    """Bytes of ``path``'s mappings resident in this process (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                inside = line.rstrip().endswith(path)
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A safetensors file of three tensors (in the page cache: just written), and them."""
    path = str(tmp_path_factory.mktemp("sharding") / "w.safetensors")
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal((256, 768), np.float32) for k in ("a", "b", "c")}
    tensors["a"][5, 7] = np.nan
    save_file(tensors, path)
    return path, tensors


def _fsdp(shape):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))
    return jax.sharding.NamedSharding(mesh, sharding.fsdp_spec(shape, 8))


@pytest.mark.devices(8)
def test_place_keeps_values_and_leaves_no_file_page_mapped(weights):
    """A kernel from an (out, in) weight, FSDP over its first dimension: every shard is
    strided through the file. The values and sharding are the tensor's, and no page of
    the file stays in this process (nor the neighbours the kernel's fault-around maps)."""
    path, tensors = weights
    flat = jft.weights.read(path)  # a fresh mapping: nothing of it is resident yet
    value = flat["b"].T
    target = _fsdp(value.shape)
    assert target.spec == jax.P("data")
    out = sharding.place(value, target, np.float32, path="params/b/kernel")
    assert _file_rss(path) == 0
    assert out.sharding == target and out.addressable_shards[0].data.shape == (96, 256)
    np.testing.assert_array_equal(np.asarray(out), tensors["b"].T)


@pytest.mark.devices(8)
def test_place_names_a_tensor_holding_nan(weights):
    path, _ = weights
    value = jft.weights.read(path)["a"].T
    with pytest.raises(WeightsError, match=r"params/a/kernel holds 1 non-finite") as info:
        sharding.place(value, _fsdp(value.shape), np.float32, path="params/a/kernel", source=path)
    assert "\n" not in str(info.value) and path in str(info.value)


def test_place_without_a_mesh_is_one_uncommitted_array_and_names_the_file_tensor(weights):
    """No sharding (``from_pretrained`` without a mesh): the whole tensor, cast, on the
    default device and uncommitted like ``jnp.asarray``'s, with no file page left
    mapped; a NaN names the file's tensor when the file's arrays are given."""
    path, tensors = weights
    flat = jft.weights.read(path)
    out = sharding.place(flat["b"].T, None, jax.numpy.bfloat16, path="params/b/kernel")
    assert _file_rss(path) == 0
    assert out.dtype == jax.numpy.bfloat16 and not out.committed
    np.testing.assert_array_equal(np.asarray(out), tensors["b"].T.astype(jax.numpy.bfloat16))
    with pytest.raises(WeightsError, match=r"tensor 'a' \(params/a/kernel\) holds 1 non-finite"):
        sharding.place(flat["a"].T, None, np.float32, path="params/a/kernel", flat=flat)
