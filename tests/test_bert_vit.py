"""BERT and ViT: equal to Hugging Face / timm with random weights, key maps, pos-embed resize.

Run with ``-s`` to see the largest difference per architecture (``[max-diff]`` lines).
"""

import os

import numpy as np
import pytest

from tests.helpers import JFT_BERT, JFT_VIT
from tests.torch_refs import (
    BERT_CFG,
    TOL,
    VIT_CFG,
    images,
    import_timm,
    max_diff,
    randomize,
    report,
    state_dict,
    text_batch,
)

timm = import_timm()  # first: it makes torchvision (which transformers imports) load

import jax
import jax.numpy as jnp
import torch
import transformers
from flax import traverse_util
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

import jft.models
import jft.weights
from jft.models.bert import attention_bias
from jft.models.vit import resize_pos_embed
from jft.weights.keymaps.vit import fit_pos_embed


def hf_bert(cls=transformers.BertModel, seed=0, **cfg):
    config = transformers.BertConfig(**{**BERT_CFG, **cfg}, attn_implementation="eager")
    return randomize(cls(config), seed)


# ----------------------------------------------------------------------------- BERT


def test_bert_paths_and_outputs():
    model = jft.models.get("bert", num_classes=0, **JFT_BERT)
    ids, mask, types = text_batch()
    variables = model.init(jax.random.key(0), ids)
    paths = set(traverse_util.flatten_dict(variables, sep="/"))
    assert "params/backbone/embeddings/word_embeddings/embedding" in paths
    assert "params/backbone/encoder/layer_1/attention/query/kernel" in paths
    assert "params/backbone/encoder/layer_0/output_layer_norm/scale" in paths
    assert not any(p.startswith("params/head") for p in paths)
    out = model.apply(variables, input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert out.last_hidden_state.shape == (3, 12, 32) and out.pooled.shape == (3, 32)
    clf = jft.models.get("minilm_l6", num_classes=5, **JFT_BERT)
    v = clf.init(jax.random.key(0), ids)
    assert v["params"]["head"]["kernel"].shape == (32, 5)
    assert clf.apply(v, input_ids=ids, attention_mask=mask).shape == (3, 5)


def test_bert_dropout_and_bf16():
    ids, mask, types = text_batch()
    model = jft.models.get("bert", num_classes=3, **JFT_BERT)
    v = model.init(jax.random.key(0), ids)
    run = lambda seed: model.apply(v, ids, mask, types, train=True, rngs={"dropout": seed})
    a, b = run(jax.random.key(1)), run(jax.random.key(2))
    assert max_diff(a, b) > 1e-3  # dropout is on
    np.testing.assert_array_equal(a, run(jax.random.key(1)))  # and deterministic per rng
    eval_out = model.apply(v, ids, mask, types, train=False)
    np.testing.assert_array_equal(eval_out, model.apply(v, ids, mask, types))

    bf16 = jft.models.get("bert", num_classes=0, dtype=jnp.bfloat16, **JFT_BERT)
    v16 = bf16.init(jax.random.key(0), ids)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v16))  # params stay float32
    out16 = bf16.apply(v16, ids, mask, types)
    assert out16.last_hidden_state.dtype == jnp.bfloat16
    out32 = jft.models.get("bert", **JFT_BERT).apply(v16, ids, mask, types)
    assert max_diff(out16.last_hidden_state, out32.last_hidden_state) < 0.1
    bias = attention_bias(jnp.asarray(mask))
    assert bias.dtype == jnp.float32 and bias.shape == (3, 1, 1, 12)
    assert float(bias.min()) < -1e30 and float(bias.max()) == 0.0


@pytest.mark.parametrize("prefixed", [False, True])
def test_bert_equals_transformers(prefixed):
    ids, mask, types = text_batch()
    if prefixed:  # BertForSequenceClassification: "bert." prefix, pooler, classifier
        ref = hf_bert(transformers.BertForSequenceClassification, num_labels=3)
        flat = state_dict(ref)
        assert any(k.startswith("bert.encoder.") for k in flat)
        model = jft.models.get("bert", num_classes=3, pooling="pooler", **JFT_BERT)
    else:
        ref = hf_bert()
        flat = state_dict(ref)
        model = jft.models.get("bert", **JFT_BERT)
    variables = model.init(jax.random.key(0), ids)
    variables, rep = jft.weights.restore(variables, flat, arch="bert")
    assert not rep.kept
    with torch.no_grad():
        t = ref(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        )
    out = model.apply(variables, input_ids=ids, attention_mask=mask, token_type_ids=types)
    if prefixed:
        d = max_diff(out, t.logits)
        report("bert (BertForSequenceClassification logits)", d)
    else:
        h = t.last_hidden_state.numpy()
        d = max_diff(out.last_hidden_state, h)
        m = mask[..., None]
        d_pool = max_diff(out.pooled, (h * m).sum(1) / m.sum(1))
        report("bert (BertModel last_hidden_state)", d)
        report("bert (mean-pooled)", d_pool)
        assert d_pool <= TOL
    assert d <= TOL


def test_bert_restore_errors():
    ids, _, _ = text_batch()
    flat = state_dict(hf_bert(transformers.BertForSequenceClassification, num_labels=3))
    model = jft.models.get("bert", num_classes=5, **JFT_BERT)
    variables = model.init(jax.random.key(0), ids)
    with pytest.raises(jft.weights.WeightsError) as e:
        jft.weights.restore(variables, flat, arch="vit")
    assert "arch='vit'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(jft.weights.WeightsError) as e:
        jft.weights.restore(variables, flat, arch="bert")
    msg = str(e.value)
    assert "params/head/kernel: file (32, 3) vs model (32, 5)" in msg and "\n" not in msg
    _, rep = jft.weights.restore(variables, flat, arch="bert", skip=["head/.*"])
    assert set(rep.kept) == {"params/head/kernel", "params/head/bias"}
    assert "bert.pooler.dense.weight" not in rep.unused  # mapped, then unused by a mean-pool model
    assert "params/backbone/pooler/kernel" in rep.unused


# ----------------------------------------------------------------------------- ViT


def timm_vit(img_size=32, num_classes=7, seed=0, **kw):
    net = VisionTransformer(
        img_size=img_size,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
        mlp_ratio=2.0,
        num_classes=num_classes,
        **kw,
    )
    return randomize(net, seed)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_vit_equals_timm(tmp_path, fmt):
    import safetensors.torch

    ref = timm_vit()
    path = os.fspath(tmp_path / f"vit.{fmt}")
    if fmt == "pth":
        torch.save(ref.state_dict(), path)
    else:
        safetensors.torch.save_file(ref.state_dict(), path)
    flat = jft.weights.read(path)
    assert "blocks.0.attn.qkv.weight" in flat  # fused: the key map splits it
    model = jft.models.get("vit", num_classes=7, layer_norm_eps=1e-6, **JFT_VIT)
    x, xt = images()
    variables, rep = jft.weights.restore(model.init(jax.random.key(0), x), flat, arch="vit")
    assert not rep.kept and not rep.unused
    with torch.no_grad():
        logits, tokens = ref(xt).numpy(), ref.forward_features(xt).numpy()
    d = max(
        max_diff(model.apply(variables, x), logits),
        max_diff(model.apply(variables, x, method="encode"), tokens),
    )
    report(f"vit (timm VisionTransformer, .{fmt})", d)
    assert d <= TOL


def test_vit_b16_preset_paths():
    model = jft.models.get("vit_b16", num_classes=10, image_size=32, num_layers=1)
    x = jnp.zeros((1, 32, 32, 3))
    params = model.init(jax.random.key(0), x)["params"]
    assert params["backbone"]["embeddings"]["pos_embed"].shape == (1, 5, 768)
    assert params["backbone"]["embeddings"]["patch_embed"]["kernel"].shape == (16, 16, 3, 768)
    assert set(params["backbone"]["encoder"]["layer_0"]) == {"norm1", "attention", "norm2", "mlp"}
    assert "ln_final" in params["backbone"] and params["head"]["kernel"].shape == (768, 10)
    assert model.apply({"params": params}, x).shape == (1, 10)
    features = jft.models.get("vit_b16", num_classes=0, image_size=32, num_layers=1)
    assert features.apply({"params": {"backbone": params["backbone"]}}, x).shape == (1, 768)


def test_vit_dropout_and_bf16():
    x, _ = images()
    model = jft.models.get("vit", num_classes=3, dropout_rate=0.5, **JFT_VIT)
    v = model.init(jax.random.key(0), x)
    a = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)}, method="encode")
    assert max_diff(a, model.apply(v, x, method="encode")) > 1e-3  # (the head is zero-init)
    bf16 = jft.models.get("vit", num_classes=3, dtype=jnp.bfloat16, **JFT_VIT)
    out = bf16.apply(v, x, method="encode")
    assert out.dtype == jnp.bfloat16
    assert max_diff(out, model.apply(v, x, method="encode")) < 0.1


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize(("old", "new"), [((4, 4), (6, 6)), ((7, 7), (3, 5)), ((14, 14), (24, 24))])
def test_resize_pos_embed_equals_timm(old, new, antialias):
    pe = torch.randn(1, 1 + old[0] * old[1], 16, generator=torch.Generator().manual_seed(0))
    ref = resample_abs_pos_embed(pe, list(new), old_size=list(old), antialias=antialias)
    d = max_diff(resize_pos_embed(pe.numpy(), new, old, antialias=antialias), ref)
    report(f"resize_pos_embed vs timm {old}->{new} antialias={antialias}", d)
    assert d <= 1e-5


def test_vit_resized_grid_equals_timm_dynamic(tmp_path):
    """32x32 weights used at 48x48: on the fly, and resampled once at restore time."""
    ref = timm_vit(dynamic_img_size=True)
    x, xt = images(size=48)
    with torch.no_grad():
        want = ref(xt).numpy()
    flat = state_dict(ref)
    small = jft.models.get("vit", num_classes=7, layer_norm_eps=1e-6, **JFT_VIT)
    v, _ = jft.weights.restore(small.init(jax.random.key(0), images()[0]), flat, arch="vit")
    d_call = max_diff(small.apply(v, x), want)
    big = jft.models.get("vit", num_classes=7, layer_norm_eps=1e-6, **{**JFT_VIT, "image_size": 48})
    init = big.init(jax.random.key(0), x)
    with pytest.raises(jft.weights.WeightsError, match="pos_embed: file"):
        jft.weights.restore(init, flat, arch="vit")
    v48, _ = jft.weights.restore(init, fit_pos_embed(flat, init), arch="vit")
    assert v48["params"]["backbone"]["embeddings"]["pos_embed"].shape == (1, 37, 32)
    d_restore = max_diff(big.apply(v48, x), want)
    report("vit 32->48 (timm dynamic_img_size, on the fly)", d_call)
    report("vit 32->48 (timm dynamic_img_size, resized at restore)", d_restore)
    assert max(d_call, d_restore) <= TOL


def test_vit_equals_transformers_interpolate_pos_encoding():
    """HF's interpolate_pos_encoding=True is plain bicubic: antialias=False."""
    config = transformers.ViTConfig(**VIT_CFG, attn_implementation="eager")
    ref = randomize(transformers.ViTModel(config, add_pooling_layer=False))
    flat = state_dict(ref)
    x, xt = images(size=48)
    with torch.no_grad():
        want = ref(pixel_values=xt, interpolate_pos_encoding=True).last_hidden_state.numpy()
    model = jft.models.get("vit", layer_norm_eps=1e-12, **{**JFT_VIT, "image_size": 48})
    init = model.init(jax.random.key(0), x)
    v, _ = jft.weights.restore(init, fit_pos_embed(flat, init, antialias=False), arch="vit")
    d = max_diff(model.apply(v, x, method="encode"), want)
    report("vit 32->48 (HF interpolate_pos_encoding)", d)
    assert d <= TOL
