"""jft.train.checkpoint and export: save/restore, keep policy, damage, topologies, export."""

import glob
import os
import shutil
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jft
from jft.train import checkpoint as ckpt_lib
from jft.train import create_train_state, parallel
from jft.train.checkpoint import Checkpointer, CheckpointError
from jft.train.export import export

# orbax's reader coroutines, cut off by a damaged file, complain once their loop is gone.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(width=8, seed=0, rules=None):
    model = jft.models.get("cnn", widths=(width, 16), num_classes=10)
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 1)))
    rules = rules or [(".*", jft.optim.adam(1e-3))]
    state = create_train_state(variables, rules, rng=seed)
    # Non-trivial optimizer state and values, so a wrong restore shows.
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [
        x + jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)


def _bump(state, step):
    """A different state, at ``step``."""
    return jax.tree.map(
        lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state
    ).replace(step=jnp.asarray(step, jnp.int32))


def _assert_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save(ck, step, state, **kw):
    return ck.save(step, state, data_state={"pos": step}, config={"seed": 0}, **kw)


def _listing(directory):
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, directory)] = os.stat(p).st_mtime_ns
    return out


def _data_files(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    return sorted(files, key=os.path.getsize, reverse=True)


def test_save_restore_round_trip_and_schedule(tmp_path):
    state = _state()
    config = ml_collections.ConfigDict({"seed": 3, "data": {"keep_classes": (5, 6)}})
    ck = Checkpointer(tmp_path / "ck", every=10, keep=2)
    assert ck.latest_step() is None
    assert not os.path.exists(tmp_path / "ck")  # nothing is written before a save
    assert not ck.save(5, state, data_state={"i": 1}, config=config)  # not due
    assert ck.save(10, state, data_state={"i": np.int64(7)}, config=config)
    # The loop donates the state's buffers right after save returns: orbax must have
    # copied them already.
    jax.tree.map(lambda x: x.delete(), state)
    ck.wait()
    fresh = _state()
    assert not ck.save(10, fresh, data_state={}, config={}, force=True)  # already there
    assert ck.save(13, _bump(fresh, 13), data_state={"i": 8}, config=config, force=True)
    ck.close()
    ck.close()  # twice is fine
    assert ck.all_steps() == [10, 13]

    ck = Checkpointer(tmp_path / "ck", every=10, keep=2)
    r = ck.restore(_state(seed=5))
    assert r.step == 13 and r.data_state == {"i": 8}
    assert r.config == {"seed": 3, "data": {"keep_classes": [5, 6]}}
    _assert_equal(r.state, _bump(_state(), 13))
    r10 = ck.restore(_state(seed=5), step=10)
    assert r10.data_state == {"i": 7}
    _assert_equal(r10.state, _state())
    with pytest.raises(CheckpointError, match="has no step 20"):
        ck.restore(_state(), step=20)
    ck.close()


def test_keeps_last_k_and_best(tmp_path):
    state = _state()
    ck = Checkpointer(tmp_path, every=1, keep=2, best_metric="eval/accuracy", best_mode="max")
    accuracies = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.65}
    for step, acc in accuracies.items():
        assert _save(ck, step, _bump(state, step), metrics={"eval/accuracy": acc, "x": 1.0})
    _save(ck, 6, _bump(state, 6))  # no metrics: kept only while among the latest
    ck.wait()
    assert ck.all_steps() == [2, 5, 6]
    assert ck.best_step() == 2
    ck.close()

    ck = Checkpointer(tmp_path / "min", every=1, keep=1, best_metric="eval/loss", best_mode="min")
    for step, loss in {1: 3.0, 2: 1.0, 3: 2.0, 4: float("nan")}.items():
        _save(ck, step, _bump(state, step), metrics={"eval/loss": np.float32(loss)})
    ck.close()
    assert ck.all_steps() == [2, 4]


def test_latest_complete_checkpoint_is_never_deleted_early(tmp_path):
    """With keep=1, at every moment of several async saves a finished step is on disk."""
    state = _state()
    ck = Checkpointer(tmp_path, every=1, keep=1)
    _save(ck, 1, state)
    ck.wait()
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(tuple(jft.checkpoint.step_dirs(str(tmp_path))))

    watcher = threading.Thread(target=watch)
    watcher.start()
    for step in range(2, 6):
        _save(ck, step, _bump(state, step))
    ck.wait()
    stop.set()
    watcher.join()
    ck.close()
    assert seen and all(seen), "a moment without any finished checkpoint"
    assert ck.all_steps() == [5]


def _damage(path, how):
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:  # flip one bit in the middle
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, how):
    state = _state()
    ck = Checkpointer(tmp_path, every=10, keep=3)
    for step in (10, 20):
        _save(ck, step, _bump(state, step))
    ck.close()
    files = _data_files(str(tmp_path / "20"))
    assert files
    for f in files:  # every data file of the latest step
        _damage(f, how)

    ck = Checkpointer(tmp_path, every=10, keep=3)
    with pytest.warns(RuntimeWarning, match=r"step 20 is damaged.*restoring step 10"):
        r = ck.restore(_state(seed=9))
    assert r.step == 10 and r.data_state == {"pos": 10}
    _assert_equal(r.state, _bump(state, 10))
    assert ck.latest_step() == 10
    # Training goes on from 10 and saves 20 again: the damaged one is moved aside, not lost.
    with pytest.warns(RuntimeWarning, match="moved it to"):
        assert _save(ck, 20, _bump(state, 21))
    ck.close()
    assert ck.all_steps() == [10, 20]
    assert os.path.isdir(tmp_path / "corrupt_step_20")
    r = Checkpointer(tmp_path, every=10).restore(_state())
    assert r.step == 20
    _assert_equal(r.state, _bump(state, 21))


def test_damaged_metadata_and_no_good_step(tmp_path):
    state = _state()
    ck = Checkpointer(tmp_path, every=1)
    _save(ck, 1, state)
    _save(ck, 2, state)
    ck.close()
    _damage(str(tmp_path / "2" / "state" / "_METADATA"), "truncate")
    os.remove(tmp_path / "1" / "data_state" / "metadata")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as e:
            Checkpointer(tmp_path, every=1).restore(state)
    # One line, naming the newest step and its damage, the others and what to do; no warning.
    msg = str(e.value)
    assert "\n" not in msg and not [w for w in record if w.category is RuntimeWarning]
    assert "no step could be restored: step 2 is damaged" in msg
    assert "and so are steps 1" in msg and "aside to start over" in msg
    # Parameters alone do not need the data state: step 1 still gives them.
    with pytest.warns(RuntimeWarning, match="step 2 is damaged.*restoring step 1"):
        flat = ckpt_lib.read_params(tmp_path)
    np.testing.assert_array_equal(flat["params/head/kernel"], state.params["head"]["kernel"])
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        Checkpointer(tmp_path / "empty", every=1).restore(state)


def test_unfinished_save_is_ignored_and_cleaned(tmp_path):
    """A save cut off (SIGKILL) leaves orbax's temporary folder: never restored, then removed."""
    state = _state()
    ck = Checkpointer(tmp_path, every=10)
    _save(ck, 10, state)
    _save(ck, 20, _bump(state, 20))
    ck.close()
    # What a kill mid-save leaves: a half-written step folder under its temporary name.
    tmp = tmp_path / "30.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(tmp_path / "20", tmp)
    for f in _data_files(str(tmp)):
        _damage(f, "truncate")
    os.remove(tmp / "_CHECKPOINT_METADATA")

    ck = Checkpointer(tmp_path, every=10)
    assert ck.latest_step() == 20
    r = ck.restore(_state())
    assert r.step == 20
    _assert_equal(r.state, _bump(state, 20))
    assert _save(ck, 30, _bump(state, 30))
    ck.close()
    assert not tmp.exists()
    assert ck.all_steps() == [10, 20, 30]


def test_mismatched_model_names_the_param_and_touches_nothing(tmp_path):
    ck = Checkpointer(tmp_path, every=1)
    _save(ck, 1, _state(width=8))
    ck.close()
    before = _listing(tmp_path)
    time.sleep(0.01)
    ck = Checkpointer(tmp_path, every=1)
    with pytest.raises(CheckpointError) as e:
        ck.restore(_state(width=4))
    msg = str(e.value)
    assert "\n" not in msg
    assert f"checkpoint {tmp_path} step 1 does not fit this model" in msg
    assert (
        "trainable/backbone/conv1/kernel is (3, 3, 1, 8) in the checkpoint and (3, 3, 1, 4)" in msg
    )
    # Different freezing rules: paths on one side only.
    frozen = _state(rules=[("backbone/conv1/.*", None), (".*", jft.optim.adam(1e-3))])
    with pytest.raises(
        CheckpointError, match="frozen/backbone/conv1/kernel is in the model but not"
    ):
        ck.restore(frozen)
    ck.close()
    assert _listing(tmp_path) == before


def _fsdp(x, mesh):
    # Shard the first axis of 8 or more that divides by 8; replicate the rest.
    spec = [None] * np.ndim(x)
    for i, d in enumerate(np.shape(x)):
        if d % 8 == 0:
            spec[i] = "data"
            break
    return NamedSharding(mesh, PartitionSpec(*spec))


def _targets(state):
    mesh = parallel.make_mesh()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    return {
        "one_device": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state
        ),
        "mesh_replicated": jax.tree.map(
            lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec())), state
        ),
        "mesh_jit": parallel.Parallel("jit", mesh).place_state(state),
        "mesh_fsdp": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_fsdp(x, mesh)), state
        ),
    }


@pytest.mark.devices(8)
def test_pmap_checkpoint_restores_on_one_device_and_mesh(tmp_path):
    state = _state()
    replicated = parallel.place_state(state, "pmap")  # pmap's layout: a leading device axis
    assert jax.tree.leaves(replicated)[0].shape[0] == 8
    canonical = parallel.host_state(replicated, "pmap")  # what the loop saves
    ck = Checkpointer(tmp_path, every=1)
    _save(ck, 1, canonical)
    ck.close()
    for name, target in _targets(state).items():
        r = Checkpointer(tmp_path, every=1).restore(target)
        _assert_equal(r.state, state)
        for got, want in zip(jax.tree.leaves(r.state), jax.tree.leaves(target), strict=True):
            assert got.sharding.is_equivalent_to(want.sharding, got.ndim), name
    # A target with pmap's device axis is another shape: restore canonical, then replicate.
    with pytest.raises(
        CheckpointError,
        match=r"head/kernel is \(16, 10\) in the checkpoint and \(8, 16, 10\).*a pmap state\?",
    ):
        Checkpointer(tmp_path, every=1).restore(replicated)


@pytest.mark.devices(8)
def test_mesh_checkpoint_restores_on_one_device_and_pmap(tmp_path):
    state = _state()
    mesh = parallel.make_mesh()
    sharded = jax.tree.map(lambda x: jax.device_put(x, _fsdp(x, mesh)), state)
    assert any(
        len(x.sharding.device_set) == 8 and not x.is_fully_replicated
        for x in jax.tree.leaves(sharded)
    )
    ck = Checkpointer(tmp_path, every=1)
    _save(ck, 1, sharded)
    ck.close()
    r = Checkpointer(tmp_path, every=1).restore(state)  # plain arrays: onto one device
    _assert_equal(r.state, state)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(r.state))
    # pmap: restore the canonical state, then replicate it for pmap.
    pstate = parallel.place_state(r.state, "pmap")
    for x, want in zip(jax.tree.leaves(pstate), jax.tree.leaves(state), strict=True):
        assert x.shape == (8, *want.shape)
        for shard in x.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data)[0], np.asarray(want))


def test_read_metadata_config_and_is_checkpoint_dir(tmp_path):
    state = _state()
    workdir = tmp_path / "run"
    ck = Checkpointer(workdir / "checkpoints", every=1, best_metric="eval/accuracy")
    ck.save(4, state, data_state={"epoch": 1}, config={"lr": 0.1}, metrics={"eval/accuracy": 0.5})
    ck.close()
    assert ckpt_lib.is_checkpoint_dir(workdir) and ckpt_lib.is_checkpoint_dir(
        workdir / "checkpoints"
    )
    assert not ckpt_lib.is_checkpoint_dir(tmp_path) and not ckpt_lib.is_checkpoint_dir(None)
    meta = jft.train.read_metadata(workdir)
    assert meta.step == 4 and meta.steps == (4,)
    assert meta.arrays["trainable/backbone/conv1/kernel"] == ((3, 3, 1, 8), "float32")
    assert meta.arrays["step"] == ((), "int32")
    assert meta.config == {"lr": 0.1} and meta.data_state == {"epoch": 1}
    assert meta.metrics == {"eval/accuracy": 0.5}
    assert ckpt_lib.read_config(workdir) == {"lr": 0.1}


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ""])
def test_export_round_trip(tmp_path, suffix):
    rules = [("backbone/conv1/.*", None), (".*", jft.optim.adam(1e-3))]
    state = _state(rules=rules)
    ck = Checkpointer(tmp_path / "run" / "checkpoints", every=1)
    _save(ck, 1, _bump(state, 1))
    _save(ck, 2, state)
    ck.close()
    dst = tmp_path / "out" / f"model{suffix}"
    assert export(tmp_path / "run", dst, step=1) == str(dst)
    if suffix:
        flat = jft.weights.read(dst)
    else:
        flat = ckpt_lib.read_params(dst)  # an orbax folder of variables
        assert ckpt_lib.is_checkpoint_dir(dst)
        meta = jft.train.read_metadata(dst)
        assert meta.step is None
        assert meta.arrays["params/backbone/conv1/kernel"] == ((3, 3, 1, 8), "float32")
        assert jft.weights.load_checkpoint(dst)["params"]["head"]["kernel"].shape == (16, 10)
    want = _bump(state, 1)
    assert set(flat) == {f"params/{k}" for k in _paths(want.params)} | {
        f"batch_stats/{k}" for k in _paths(want.batch_stats)
    }
    np.testing.assert_array_equal(
        flat["params/backbone/conv1/kernel"], want.frozen["backbone"]["conv1"]["kernel"]
    )
    # Back into a model with the "jft" key map.
    init = {"params": _state().params, "batch_stats": _state().batch_stats}
    variables, report = jft.weights.restore(init, flat, arch="jft")
    assert not report.kept and not report.unused
    _assert_equal(variables, {"params": want.params, "batch_stats": want.batch_stats})
    with pytest.raises(CheckpointError, match="already exists"):
        export(tmp_path / "run", dst)


def _paths(tree):
    return {
        "/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


# -- adapter-only checkpoints of a LoRA run (issue 17) ---------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny BERT with LoRA on query/value, its base saved as an orbax folder, a jitted step,
    and an adapter-only checkpoint at step 2 of a 4-step run."""
    from jft.peft import LoraConfig
    from tests.helpers import QV, xent

    tmp = tmp_path_factory.mktemp("lora")
    bert = dict(vocab_size=100, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)
    model = jft.models.get("bert", num_classes=3, max_position_embeddings=16, **bert)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 100, (4, 12)), jnp.int32)
    base = jax.jit(model.init)(jax.random.key(0), ids)
    jft.weights.save_checkpoint(tmp / "base", base)
    lora = jft.peft.lora(model, LoraConfig(targets=(QV,), rank=4, alpha=8))
    variables = jft.peft.init_adapters(lora, base, ids)
    rules = jft.peft.adapter_rules(jft.optim.adam(1e-2), also=["head/.*"])
    step = jft.train.make_train_step(lora, rules, xent, norms=False)
    batches = [
        {"input_ids": ids + i, "label": jnp.asarray([0, 1, 2, i % 3], jnp.int32)} for i in range(4)
    ]

    def template():
        return create_train_state(jax.tree.map(jnp.array, variables), rules, rng=0)

    state = template()
    ck = Checkpointer(tmp / "run", every=2, async_save=False, frozen_base=str(tmp / "base"))
    for i, batch in enumerate(batches, 1):
        state, _ = step(state, batch)
        _save(ck, i, state)
        if i == 2:
            at_2 = jax.tree.map(np.array, state)
    ck.close()
    with Checkpointer(tmp / "full", every=2, async_save=False) as full:
        _save(full, 2, jax.tree.map(jnp.asarray, at_2))
    return dict(
        tmp=tmp, step=step, batches=batches, template=template, at_2=at_2, end=state, base=base
    )


def _size(folder):
    return sum(
        os.path.getsize(p) for p in glob.glob(f"{folder}/**", recursive=True) if os.path.isfile(p)
    )


def test_a_lora_checkpoint_holds_the_adapters_and_names_its_base(lora_run):
    tmp, at_2 = lora_run["tmp"], lora_run["at_2"]
    meta = ckpt_lib.read_metadata(tmp / "run", step=2)
    assert meta.arrays and not [p for p in meta.arrays if p.startswith("frozen/")]
    assert any("lora_B" in p for p in meta.arrays) and any(
        p.startswith("opt_state/") for p in meta.arrays
    )
    assert meta.base["path"] == str(tmp / "base") and len(meta.base["hash"]) == 8
    assert set(meta.base["arrays"]) == set(ckpt_lib.checksums(at_2.frozen))
    full = ckpt_lib.read_metadata(tmp / "full", step=2)
    assert full.base is None and any(p.startswith("frozen/") for p in full.arrays)
    lora_bytes, full_bytes = _size(tmp / "run" / "2"), _size(tmp / "full" / "2")
    print(
        f"\ncheckpoint of a 1-layer BERT-32, LoRA r=4 on q/v: {lora_bytes} B, full {full_bytes} B"
    )
    assert lora_bytes < 0.7 * full_bytes


def test_a_lora_run_resumes_exactly_onto_its_base(lora_run):
    ck = Checkpointer(lora_run["tmp"] / "run", every=2, frozen_base=str(lora_run["tmp"] / "base"))
    template = lora_run["template"]()
    restored = ck.restore(template, step=2)
    ck.close()
    _assert_equal(restored.state, lora_run["at_2"])
    assert restored.state.frozen is template.frozen and restored.base["hash"]
    state = restored.state
    for batch in lora_run["batches"][2:]:
        state, _ = lora_run["step"](state, batch)
    _assert_equal(state, lora_run["end"])  # stop at 2, resume, steps 3 and 4: the same bits


def test_a_lora_checkpoint_refuses_another_base_naming_both(lora_run):
    template = lora_run["template"]()
    other = template.replace(frozen=jax.tree.map(lambda x: x + 1, template.frozen))
    directory = lora_run["tmp"] / "run"
    before = _listing(directory)
    with pytest.raises(CheckpointError) as e:
        Checkpointer(directory, every=2, frozen_base="/elsewhere/bert").restore(other)
    msg = str(e.value)
    assert "\n" not in msg and str(lora_run["tmp"] / "base") in msg and "/elsewhere/bert" in msg
    ours = jft.checkpoint.base.describe("", other.frozen)["hash"]
    assert ckpt_lib.read_metadata(directory).base["hash"] in msg and ours in msg
    assert _listing(directory) == before


def test_reading_a_lora_run_fills_the_base_in_from_its_path(lora_run):
    from flax import traverse_util

    end = lora_run["end"]
    flat = jft.weights.read(lora_run["tmp"] / "run")
    want = traverse_util.flatten_dict({"params": end.params}, sep="/")
    assert sorted(flat) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(flat[k], np.asarray(v), err_msg=k)
