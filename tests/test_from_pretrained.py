"""from_pretrained on Hugging Face folders (BERT, ViT, ResNet) of random weights.

Every folder layout ``jft.weights.read`` takes: ``model.safetensors``, a sharded
safetensors index, ``pytorch_model.bin``. Run with ``-s`` for the ``[max-diff]`` lines.
"""

import json
import logging
import os

import numpy as np
import pytest

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

import_timm()  # first: it makes torchvision (which transformers imports) load

import jax.numpy as jnp
import torch
import transformers

import jft.weights
from jft.models.bert import BertOutput
from jft.weights import WeightsError, from_pretrained


def save(model: transformers.PreTrainedModel, folder: str, fmt: str) -> str:
    """Saves ``model`` as Hugging Face does: one safetensors file, shards, or a .bin."""
    if fmt == "safetensors":
        model.save_pretrained(folder)
    elif fmt == "sharded":
        model.save_pretrained(folder, max_shard_size="20KB")
        assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    else:  # transformers 5 writes safetensors only; older versions wrote this
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    return folder


# ----------------------------------------------------------------------------- BERT


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_bert_folder(tmp_path, fmt):
    config = transformers.BertConfig(**BERT_CFG, attn_implementation="eager")
    ref = randomize(transformers.BertModel(config))
    model, variables = from_pretrained(save(ref, str(tmp_path), fmt))
    assert model.pooling == "mean" and model.num_layers == 2
    ids, mask, types = text_batch()
    out = model.apply(variables, input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert isinstance(out, BertOutput)
    with torch.no_grad():
        want = ref(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        ).last_hidden_state.numpy()
    m = mask[..., None]
    d = max_diff(out.last_hidden_state, want)
    d_pool = max_diff(out.pooled, (want * m).sum(1) / m.sum(1))
    report(f"bert from_pretrained ({fmt}) last_hidden_state", d)
    report(f"bert from_pretrained ({fmt}) mean-pooled", d_pool)
    assert max(d, d_pool) <= TOL


def test_bert_sequence_classification_folder(tmp_path):
    config = transformers.BertConfig(**BERT_CFG, num_labels=3, attn_implementation="eager")
    ref = randomize(transformers.BertForSequenceClassification(config))
    folder = save(ref, str(tmp_path), "safetensors")
    model, variables = from_pretrained(folder, num_classes=3)
    assert model.pooling == "pooler"  # HF's classifier reads tanh(dense(CLS))
    ids, mask, types = text_batch()
    with torch.no_grad():
        want = ref(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        ).logits.numpy()
    d = max_diff(model.apply(variables, ids, mask, types), want)
    report("bert from_pretrained (BertForSequenceClassification logits)", d)
    assert d <= TOL

    # Another number of classes: an error naming the head, unless skipped.
    with pytest.raises(WeightsError) as e:
        from_pretrained(folder, num_classes=5)
    assert "params/head/kernel: file (32, 3) vs model (32, 5)" in str(e.value)
    assert "\n" not in str(e.value)
    model, variables = from_pretrained(folder, num_classes=5, skip=["head/.*"])
    assert model.apply(variables, ids, mask, types).shape == (3, 5)
    # No head: the file's classifier is unused, the encoder the same.
    model, variables = from_pretrained(folder, pooling="mean")
    assert isinstance(model.apply(variables, ids, mask, types), BertOutput)


def test_bert_new_head_needs_skip(tmp_path, caplog):
    ref = randomize(transformers.BertModel(transformers.BertConfig(**BERT_CFG)))
    folder = save(ref, str(tmp_path), "safetensors")
    with pytest.raises(WeightsError, match=r"missing from the file: .*params/head/kernel.*skip="):
        from_pretrained(folder, num_classes=4)
    with caplog.at_level(logging.WARNING, logger="jft.weights.pretrained"):
        model, variables, report = from_pretrained(
            folder, num_classes=4, skip=["head/.*"], dtype=jnp.bfloat16, return_report=True
        )
    assert set(report.kept) == {"params/head/kernel", "params/head/bias"}
    assert "kept 2 from init" in caplog.text  # said, not hidden at INFO
    ids, mask, _ = text_batch()
    logits = model.apply(variables, input_ids=ids, attention_mask=mask)
    assert logits.shape == (3, 4) and logits.dtype == jnp.bfloat16
    assert variables["params"]["head"]["kernel"].dtype == jnp.float32
    assert float(jnp.abs(variables["params"]["head"]["kernel"]).max()) > 0  # initialized


def test_sentence_transformers_pooling_config(tmp_path):
    ref = randomize(transformers.BertModel(transformers.BertConfig(**BERT_CFG)))
    folder = save(ref, str(tmp_path), "safetensors")
    os.makedirs(os.path.join(folder, "1_Pooling"))
    pooling = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump(pooling, f)
    model, variables = from_pretrained(folder)
    assert model.pooling == "cls"
    ids, mask, _ = text_batch()
    out = model.apply(variables, ids, mask)
    np.testing.assert_array_equal(out.pooled, out.last_hidden_state[:, 0])


# ----------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_vit_folder(tmp_path, fmt):
    config = transformers.ViTConfig(**VIT_CFG, num_labels=5, attn_implementation="eager")
    ref = randomize(transformers.ViTForImageClassification(config))
    model, variables = from_pretrained(save(ref, str(tmp_path), fmt), num_classes=5)
    x, xt = images()
    with torch.no_grad():
        out = ref(pixel_values=xt, output_hidden_states=True)
        tokens = ref.vit.layernorm(out.hidden_states[-1]).numpy()
    d = max(
        max_diff(model.apply(variables, x), out.logits),
        max_diff(model.apply(variables, x, method="encode"), tokens),
    )
    report(f"vit from_pretrained ({fmt}) ViTForImageClassification", d)
    assert d <= TOL


def test_vit_folder_other_image_size(tmp_path):
    """image_size=48 on a 32 folder: pos embed resampled at restore, equal to HF's interpolation."""
    config = transformers.ViTConfig(**VIT_CFG, attn_implementation="eager")
    ref = randomize(transformers.ViTModel(config))
    folder = save(ref, str(tmp_path), "safetensors")
    x, xt = images(size=48)
    with torch.no_grad():
        want = ref(pixel_values=xt, interpolate_pos_encoding=True).last_hidden_state.numpy()
    model, variables = from_pretrained(folder, image_size=48)
    assert variables["params"]["backbone"]["embeddings"]["pos_embed"].shape == (1, 37, 32)
    d_restore = max_diff(model.apply(variables, x, method="encode"), want)
    model, variables = from_pretrained(folder)  # 32: resampled on the fly for 48
    d_call = max_diff(model.apply(variables, x, method="encode"), want)
    report("vit from_pretrained 32->48 at restore (HF interpolate_pos_encoding)", d_restore)
    report("vit from_pretrained 32->48 on the fly (HF interpolate_pos_encoding)", d_call)
    assert max(d_restore, d_call) <= TOL


# ----------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize(
    "cfg",
    [
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic"),
        dict(
            embedding_size=8,
            hidden_sizes=[16, 32],
            depths=[2, 1],
            layer_type="bottleneck",
            downsample_in_first_stage=True,
        ),
        dict(
            embedding_size=8,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            layer_type="bottleneck",
            downsample_in_bottleneck=True,
        ),
    ],
    ids=["basic", "bottleneck-first-stride", "bottleneck-stride-in-1x1"],
)
def test_resnet_folder(tmp_path, cfg):
    config = transformers.ResNetConfig(**cfg, num_labels=4)
    ref = randomize(transformers.ResNetForImageClassification(config))
    model, variables = from_pretrained(save(ref, str(tmp_path), "safetensors"), num_classes=4)
    x, xt = images(size=64)
    with torch.no_grad():
        out = ref(pixel_values=xt, output_hidden_states=True)
        features = ref.resnet(pixel_values=xt).last_hidden_state.numpy().transpose(0, 2, 3, 1)
    d = max(
        max_diff(model.apply(variables, x), out.logits),
        max_diff(model.apply(variables, x, method="features"), features),
    )
    report(f"resnet from_pretrained ({cfg['layer_type']}, {sorted(cfg)})", d)
    assert d <= TOL


def test_resnet_bin_folder_without_head(tmp_path):
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    ref = randomize(transformers.ResNetModel(config))
    model, variables = from_pretrained(save(ref, str(tmp_path), "bin"))
    x, xt = images(size=64)
    with torch.no_grad():
        want = ref(pixel_values=xt).pooler_output.numpy()[:, :, 0, 0]
    d = max_diff(model.apply(variables, x), want)
    report("resnet from_pretrained (pytorch_model.bin, pooled)", d)
    assert d <= TOL


# ----------------------------------------------------------------------------- errors


def test_folder_errors(tmp_path):
    with pytest.raises(WeightsError) as e:
        from_pretrained(tmp_path)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WeightsError, match="no such folder"):
        from_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(WeightsError) as e:
        from_pretrained(tmp_path)
    assert "model_type 't5' is not supported" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="config.json: not readable JSON"):
        from_pretrained(tmp_path)
    # A valid config without weights: the reader's one-line error.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **BERT_CFG}))
    with pytest.raises(WeightsError) as e:
        from_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def test_exported_names():
    assert jft.weights.from_pretrained is from_pretrained
    assert "from_pretrained" in jft.weights.__all__
