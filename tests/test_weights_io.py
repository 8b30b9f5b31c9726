"""jft.weights.read for every format, convert/load_checkpoint, and peak memory on a large file."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

import jft.models
import jft.weights


def _state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "conv1.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn1.running_var": torch.rand(4, generator=g),
        "fc.bias": torch.arange(5, dtype=torch.float32),
        "emb.weight": torch.randn(3, 2, generator=g).to(torch.bfloat16),
        "bn1.num_batches_tracked": torch.tensor(3),
    }


def _assert_same(flat, sd):
    assert set(flat) == set(sd)
    for k, t in sd.items():
        expected = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert flat[k].shape == tuple(t.shape), k
        np.testing.assert_array_equal(np.asarray(flat[k], np.float32), expected.astype(np.float32))
    assert flat["emb.weight"].dtype == ml_dtypes.bfloat16


def test_safetensors_is_memory_mapped(tmp_path):
    sd = _state_dict()
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(sd, str(path), metadata={"format": "pt"})
    flat = jft.weights.read(path)
    _assert_same(flat, sd)
    assert isinstance(flat["conv1.weight"].base, np.memmap)  # a view, not a copy
    assert not flat["conv1.weight"].flags.writeable


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
    ],
    ids=["plain", "state_dict", "model", "module-prefix"],
)
def test_torch_containers(tmp_path, wrap):
    sd = _state_dict()
    path = tmp_path / "w.pth"
    torch.save(wrap(sd), path)
    _assert_same(jft.weights.read(path), sd)


def test_torch_legacy_format_and_bin(tmp_path):
    sd = _state_dict()
    torch.save(sd, tmp_path / "w.pt", _use_new_zipfile_serialization=False)  # cannot be mmapped
    _assert_same(jft.weights.read(tmp_path / "w.pt"), sd)
    torch.save(sd, tmp_path / "w.bin")
    _assert_same(jft.weights.read(tmp_path / "w.bin"), sd)


def test_npz(tmp_path):
    arrays = {"a.weight": np.ones((2, 3), np.float32), "b": np.arange(4)}
    np.savez(tmp_path / "w.npz", **arrays)
    flat = jft.weights.read(tmp_path / "w.npz")
    assert set(flat) == set(arrays)
    np.testing.assert_array_equal(flat["b"], arrays["b"])


def test_hf_folders(tmp_path):
    sd = {k: v for k, v in _state_dict().items() if k != "emb.weight"}
    arrays = {k: v.numpy() for k, v in sd.items()}
    # model.safetensors
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text("{}")
    safetensors.numpy.save_file(arrays, str(single / "model.safetensors"))
    _assert_same_np(jft.weights.read(single), arrays)
    # sharded safetensors
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(arrays)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    weight_map = {}
    for shard, keys in shards.items():
        safetensors.numpy.save_file({k: arrays[k] for k in keys}, str(sharded / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same_np(jft.weights.read(sharded), arrays)
    # pytorch_model.bin
    binf = tmp_path / "bin"
    binf.mkdir()
    torch.save(sd, binf / "pytorch_model.bin")
    _assert_same_np(jft.weights.read(binf), arrays)


def _assert_same_np(flat, arrays):
    assert set(flat) == set(arrays)
    for k in arrays:
        np.testing.assert_array_equal(flat[k], arrays[k])


def test_keras3_variable_names(tmp_path):
    import keras

    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(2, 3, name="c")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.LayerNormalization()(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, use_bias=False)(x)
    model = keras.Model(inputs, outputs)
    model.save_weights(tmp_path / "m.weights.h5")
    flat = jft.weights.read(tmp_path / "m.weights.h5")
    # Keras 3 names layers by class and order, whatever name= says.
    assert set(flat) == {
        "conv2d/kernel",
        "conv2d/bias",
        "batch_normalization/gamma",
        "batch_normalization/beta",
        "batch_normalization/moving_mean",
        "batch_normalization/moving_variance",
        "layer_normalization/gamma",
        "layer_normalization/beta",
        "dense/kernel",
    }
    np.testing.assert_array_equal(flat["dense/kernel"], model.layers[-1].kernel.numpy())


def test_convert_and_load_checkpoint_round_trip(tmp_path):
    from tests.torch_refs import import_timm

    timm = import_timm()
    ref = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    src = tmp_path / "r18.safetensors"
    safetensors.torch.save_file(ref.state_dict(), str(src))

    x = jnp.zeros((1, 32, 32, 3))
    dst = tmp_path / "ckpt"
    report = jft.weights.convert(
        src, dst, model="resnet18", model_kwargs={"num_classes": 4}, example_input=x
    )
    assert not report.kept and not report.unused
    restored = jft.weights.load_checkpoint(dst)

    model = jft.models.get("resnet18", num_classes=4)
    expected, _ = jft.weights.restore(
        model.init(jax.random.key(0), x), jft.weights.read(src), "resnet"
    )
    jax.tree.map(np.testing.assert_array_equal, restored, expected)
    assert restored["batch_stats"]["backbone"]["bn1"]["var"].shape == (64,)

    # No model: the key map's output as it is, arch inferred from the names.
    raw = tmp_path / "raw"
    jft.weights.convert(src, raw)
    jax.tree.map(np.testing.assert_array_equal, jft.weights.load_checkpoint(raw), expected)

    with pytest.raises(jft.weights.WeightsError, match="already exists"):
        jft.weights.convert(src, dst)
    assert jft.weights.infer_arch(jft.weights.read(src)) == "resnet"


_PEAK_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, psutil
    import jft.weights
    import torch  # imported before measuring, as jft.weights.read would
    jax.numpy.zeros(1).block_until_ready()


    def hwm():  # peak RSS of this process image (ru_maxrss may carry the parent's across exec)
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))


    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS
    base = psutil.Process().memory_info().rss
    flat = jft.weights.read(sys.argv[1])
    # Restore: every array into a JAX buffer, as jft.weights.restore does.
    out = {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}
    # jnp.asarray may alias an aligned host buffer: read every value so that each
    # page is really in memory.
    checksum = sum(float(jnp.sum(a)) for a in out.values())
    print(hwm() - base)
    """
)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_peak_memory_at_most_twice_the_weights(tmp_path, fmt):
    """Reading and restoring a 200 MB file stays within 2x its size above the baseline.

    The two copies are the file's pages, mapped and counted in RSS as they are read
    (file-backed: the kernel can drop them), and the JAX buffers; 16 MiB of slack
    covers the interpreter's own allocations.
    """
    rng = np.random.default_rng(0)
    arrays = {f"layer{i}.weight": rng.random((1024, 5 * 1024), np.float32) for i in range(10)}
    size = sum(a.nbytes for a in arrays.values())
    path = tmp_path / f"big.{fmt}"
    if fmt == "safetensors":
        safetensors.numpy.save_file(arrays, str(path))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    del arrays
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    res = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    delta = int(res.stdout.split()[-1])
    print(f"{fmt}: peak RSS above baseline {delta / 2**20:.0f} MiB for {size / 2**20:.0f} MiB")
    assert delta <= 2 * size + 16 * 2**20, (
        f"peak {delta / 2**20:.0f} MiB > 2 x {size / 2**20:.0f} MiB"
    )


def test_read_takes_an_orbax_folder_of_variables(tmp_path):
    variables = {
        "params": {"head": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}},
        "batch_stats": {"backbone": {"bn1": {"mean": np.ones(3, np.float32)}}},
    }
    jft.weights.save_checkpoint(tmp_path / "v", variables)
    flat = jft.weights.read(tmp_path / "v")
    assert sorted(flat) == ["batch_stats/backbone/bn1/mean", "params/head/kernel"]
    np.testing.assert_array_equal(flat["params/head/kernel"], variables["params"]["head"]["kernel"])


def test_read_takes_a_run_and_a_step_folder_as_the_state_holds_them(tmp_path):
    from flax import traverse_util

    from jft.train import Checkpointer, create_train_state

    model = jft.models.get("cnn", widths=(4, 8), num_classes=3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    rules = [("head/.*", jft.optim.adam(1e-3)), (".*", None)]  # a frozen trunk: merged back
    first = create_train_state(variables, rules, rng=0)
    second = first.replace(trainable=jax.tree.map(lambda x: x + 1, first.trainable))
    with Checkpointer(tmp_path / "checkpoints", every=1, async_save=False) as ck:
        for step, state in ((1, first), (2, second)):
            ck.save(step, state, data_state={}, config={})

    def flat(state):
        out = {"params": state.params, "batch_stats": state.batch_stats}
        return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(out, sep="/").items()}

    for path, state in (
        (tmp_path, second),  # the workdir: its latest step
        (tmp_path / "checkpoints", second),
        (tmp_path / "checkpoints" / "1", first),  # one step's folder
    ):
        got, want = jft.weights.read(path), flat(state)
        assert sorted(got) == sorted(want) and "params/head/kernel" in got, path
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{path}: {k}")
    assert not np.array_equal(flat(first)["params/head/kernel"], flat(second)["params/head/kernel"])


def _module_imports(root):
    """jft module -> the jft modules it imports anywhere, inside functions too.

    A function-local import does not make a cycle go away, it only hides it
    (STYLE.md); imports under ``if TYPE_CHECKING`` are for type checkers only.
    """
    import ast
    import pathlib

    modules = {}
    for path in pathlib.Path(root, "jft").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    targets.add(sub if sub in modules else node.module)
        # A module's own parent packages are mid-import when it runs: not an edge.
        graph[name] = {
            t for t in targets if t in modules and t != name and not name.startswith(t + ".")
        }
    return graph


def test_no_import_cycle_among_jft_modules():
    import pathlib

    graph = _module_imports(pathlib.Path(__file__).resolve().parents[1])
    assert "jft.checkpoint.manager" in graph["jft.checkpoint.variables"]
    state, stack, cycles = {}, [], []

    def walk(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                walk(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            walk(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    # jft.weights reads runs through jft.checkpoint, which knows nothing of jft.weights or train.
    assert not any(
        t.startswith(("jft.weights", "jft.train"))
        for m in graph
        if m.startswith("jft.checkpoint")
        for t in graph[m]
    )
