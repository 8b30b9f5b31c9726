"""Decoder language models (GPT-2, Llama, Mistral, Qwen2/3, Gemma, Gemma 2) against transformers.

Each family: a transformers model from a tiny random config, saved as a Hugging
Face folder, loaded with ``jft.weights.from_pretrained``; logits (with left
padding), greedy generation and KV-cache decoding are compared. Run with ``-s``
for the ``[max-diff]`` lines.
"""

import json
import os
import pathlib
import re

import numpy as np
import pytest

from tests.helpers import LLAMA3_ROPE
from tests.torch_refs import import_timm, max_diff, report

import_timm()  # first: it makes torchvision (which transformers imports) load

import jax
import jax.numpy as jnp
import torch
import transformers

import jft.models
from jft.errors import JftError
from jft.models import generate as gen
from jft.models.llama import Llama
from jft.train import losses
from jft.weights import WeightsError, from_pretrained, keymaps

TOL = 1e-4
VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
# One tiny config per family; each sets what its family changes, small enough to matter
# (a sliding window shorter than the prompt, soft caps near the logits' size).
FAMILIES = {
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    ),
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            _COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters=dict(LLAMA3_ROPE),
        ),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(_COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=4),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(_COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(_COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    ),
    "gemma": (
        transformers.GemmaConfig,
        transformers.GemmaForCausalLM,
        dict(_COMMON, num_attention_heads=2, num_key_value_heads=1, head_dim=16),
    ),
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(
            _COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=4,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
}
STOP, PAD = 1, 0


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of std 0.15 (logits of order 1, so greedy choices are not near-ties); norm
    weights and biases away from their 1/0 init, so each mapping and convention matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model.eval()


def _hf(family: str, seed: int = 0, **extra):
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(
        **kwargs, **extra, pad_token_id=PAD, eos_token_id=STOP, bos_token_id=2,
        attn_implementation="eager",
    )  # fmt: skip
    return _randomize(model_cls(config), seed)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """family -> (transformers model, its folder, jft model, variables), built once."""
    cache = {}

    def get(family: str):
        if family not in cache:
            ref = _hf(family)
            folder = tmp_path_factory.mktemp(family)
            ref.save_pretrained(folder)
            model, variables = from_pretrained(folder)
            cache[family] = (ref, os.fspath(folder), model, variables)
        return cache[family]

    return get


def _batch(seed: int = 0, t: int = 10):
    """Two prompts; the second left-padded by 3. Position ids skip the padding."""
    ids = np.random.default_rng(seed).integers(3, VOCAB, size=(2, t))
    mask = np.ones((2, t), np.int64)
    mask[1, :3] = 0
    ids = np.where(mask == 1, ids, PAD)
    return ids, mask, np.maximum(mask.cumsum(-1) - 1, 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(loaded, family):
    ref, _, model, variables = loaded(family)
    ids, mask, pos = _batch()
    with torch.no_grad():
        want = ref(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos),
        ).logits.numpy()
    got = np.asarray(jax.jit(model.apply)(variables, ids, mask))
    assert got.shape == (2, 10, VOCAB) and got.dtype == np.float32
    diff = max(max_diff(got[0], want[0]), max_diff(got[1, 3:], want[1, 3:]))  # real tokens
    report(f"{family} logits", diff)
    assert diff < TOL
    assert np.abs(want).max() > 0.5  # the logits are not trivially small


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers(loaded, family):
    ref, _, model, variables = loaded(family)
    ids, mask, _ = _batch(seed=1, t=6)
    with torch.no_grad():
        out = ref.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=20,
            min_new_tokens=0,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=STOP,
        ).numpy()[:, 6:]
    want = np.full((2, 20), PAD)
    want[:, : out.shape[1]] = out
    got = gen.generate(
        model, variables, ids, mask, max_new_tokens=20, stop_tokens=[STOP], pad_id=PAD
    )
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_cache_decoding_equals_full_forward(loaded, family):
    """Prefill 4 tokens, then one token at a time: every step's logits equal the full forward's."""
    _, _, model, variables = loaded(family)
    ids, mask, _ = _batch(seed=2, t=9)
    full = np.asarray(jax.jit(model.apply)(variables, ids, mask))
    apply = jax.jit(lambda c, tok, i: model.apply(variables, tok, mask, cache=c, cache_index=i))
    logits, cache = apply(model.init_cache(2, 9), ids[:, :4], jnp.int32(0))
    steps = [np.asarray(logits)]
    for i in range(4, 9):
        logits, cache = apply(cache, ids[:, i : i + 1], jnp.int32(i))
        steps.append(np.asarray(logits))
    got = np.concatenate(steps, axis=1)
    diff = max(max_diff(got[0], full[0]), max_diff(got[1, 3:], full[1, 3:]))
    report(f"{family} cache vs full", diff)
    assert diff < 1e-5


def test_decode_step_compiles_once(loaded):
    """20 new tokens trace the decode step once; a second prompt of the same shape, never."""
    _, _, model, variables = loaded("llama")
    ids, mask, _ = _batch(seed=3, t=5)
    before = gen.TRACES["decode_step"]
    gen.generate(model, variables, ids, mask, max_new_tokens=20)
    assert gen.TRACES["decode_step"] - before == 1
    gen.generate(model, variables, ids[::-1], mask[::-1], max_new_tokens=20, top_k=5)
    assert gen.TRACES["decode_step"] - before == 1


def test_sampling_filters():
    """top-k keeps the k largest, top-p the smallest nucleus, temperature -> 0 is greedy."""
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]] * 512))
    key = jax.random.key(0)
    choose = jax.jit(gen.choose_tokens, static_argnames="sample")

    def draw(temperature=1.0, top_k=0, top_p=1.0, sample=True):  # one trace per `sample`
        hyper = jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)
        return np.asarray(choose(logits, key, *hyper, sample=sample))

    assert set(draw(temperature=1.0, top_k=2).tolist()) == {0, 1}
    assert set(draw(temperature=1.0, top_p=0.7).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draw(temperature=1.0, top_p=0.5).tolist()) == {0}
    assert set(draw(temperature=1.0).tolist()) == {0, 1, 2, 3, 4}
    assert set(draw(temperature=1e-3).tolist()) == {0}
    np.testing.assert_array_equal(draw(sample=False), np.zeros(512))
    freq = np.bincount(draw(temperature=1.0), minlength=5) / 512
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.1, 0.06, 0.04], atol=0.07)


def test_stop_tokens_pad_the_rest(loaded):
    _, _, model, variables = loaded("qwen2")
    ids, mask, _ = _batch(seed=4, t=5)
    free = np.asarray(gen.generate(model, variables, ids, mask, max_new_tokens=8))
    stop = int(free[0, 2])
    got = np.asarray(
        gen.generate(model, variables, ids, mask, max_new_tokens=8, stop_tokens=[stop], pad_id=99)
    )
    first = int(np.argmax(free[0] == stop))
    np.testing.assert_array_equal(got[0, : first + 1], free[0, : first + 1])
    assert (got[0, first + 1 :] == 99).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_keymap_round_trip(loaded, family):
    """import -> export with the same table gives back every tensor of the folder, same names."""
    ref, _, _, _ = loaded(family)
    flat = {k: v.numpy() for k, v in ref.state_dict().items()}
    arch = "gpt2" if family == "gpt2" else "llama"
    mapped, unused = keymaps.get(arch)(flat)
    assert unused == []
    back, left = keymaps.inverse(arch)(mapped, "hf")
    assert left == [] and set(back) == set(flat)
    for name, value in flat.items():
        np.testing.assert_array_equal(back[name], value)


def test_sharded_folder(tmp_path):
    ref = _hf("mistral", seed=5)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    model, variables = from_pretrained(tmp_path)
    ids, mask, pos = _batch(seed=5)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids[:1])).logits.numpy()
    assert max_diff(model.apply(variables, ids[:1]), want) < TOL
    os.remove(tmp_path / shards[1])
    with pytest.raises(WeightsError, match=rf"{shards[1]}: no such file \(a shard listed in"):
        from_pretrained(tmp_path)


def _config_folder(tmp_path, family: str, **changes):
    ref = _hf(family)
    ref.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    "family, changes, message",
    [
        ("llama", dict(model_type="mixtral"), r"model_type 'mixtral' is not supported"),
        (
            "llama",
            dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)),
            r"rope type 'yarn' is not supported",
        ),
        ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), r"scale_attn_by_inverse_layer_idx"),
        ("qwen2", dict(layer_types=["full_attention", "chunked"]), r"layer_types \['chunked'\]"),
    ],
)
def test_unsupported_config_is_one_line(tmp_path, family, changes, message):
    folder = _config_folder(tmp_path, family, **changes)
    with pytest.raises(WeightsError, match=message) as info:
        from_pretrained(folder)
    assert "\n" not in str(info.value) and "config.json" in str(info.value)


def test_remat_identical_and_bf16_params_close():
    """remat: the same loss bitwise, gradients to 1e-5; bf16 parameters: logits within 2e-2."""
    kw = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
              intermediate_size=64)  # fmt: skip
    ids = jnp.array(np.random.default_rng(6).integers(0, 64, (2, 7)))
    plain = Llama(**kw)
    variables = jax.jit(plain.init)(jax.random.key(0), ids)

    def loss(model, v):
        return jnp.mean(model.apply(v, ids) ** 2)

    value, grads = jax.jit(jax.value_and_grad(lambda v: loss(plain, v)))(variables)
    remat = Llama(**kw, remat="dots_no_batch")
    value_r, grads_r = jax.jit(jax.value_and_grad(lambda v: loss(remat, v)))(variables)
    assert float(value_r) == float(value)
    # Gradients: the recomputed forward is bitwise the same, but XLA orders the embedding's
    # scatter-add differently with remat, so a few sums differ in the last bit.
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    jax.tree.map(close, grads_r, grads)
    with pytest.raises(JftError, match="remat='sometimes' is not a policy"):
        jax.eval_shape(Llama(**kw, remat="sometimes").init, jax.random.key(0), ids)

    bf16 = Llama(**kw, param_dtype=jnp.bfloat16)
    v16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables)
    shapes = jax.eval_shape(bf16.init, jax.random.key(0), ids)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(shapes))
    full = np.asarray(jax.jit(plain.apply)(variables, ids))
    half = np.asarray(jax.jit(bf16.apply)(v16, ids))
    assert half.dtype == np.float32  # logits are float32 whatever the parameters
    assert max_diff(half, full) < 2e-2 * max(1.0, np.abs(full).max())


def test_causal_lm_loss_equals_transformers(loaded):
    """Completion-only loss with left padding: HF's ``labels`` loss, by labels or by masks."""
    ref, _, model, variables = loaded("qwen2")
    ids, mask, pos = _batch(seed=7)
    prompt = np.zeros_like(mask)
    prompt[0, :4], prompt[1, 3:6] = 1, 1  # the first 4 / 3 real tokens are the prompt
    loss_mask = mask * (1 - prompt)
    labels = np.where(loss_mask == 1, ids, -100)
    with torch.no_grad():
        out = ref(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos),
            labels=torch.tensor(labels),
        )
        row0 = ref(input_ids=torch.tensor(ids[:1]), labels=torch.tensor(labels[:1])).loss
    logits = jax.jit(model.apply)(variables, ids, mask)
    loss = losses.get("causal_lm_xent", label_smoothing=0.0)
    by_labels = loss(logits, {"labels": labels})
    by_masks = loss(logits, {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask})
    assert abs(float(by_labels) - float(out.loss)) < 1e-5
    assert abs(float(by_masks) - float(out.loss)) < 1e-5
    assert float(loss(logits, {"labels": labels, "mask": np.array([1, 0])})) == pytest.approx(
        float(row0), abs=1e-5
    )
    # The prompt's tokens do not count: changing their targets leaves the loss as it is.
    other = np.where(prompt == 1, (ids + 1) % VOCAB, ids)
    same = loss(logits, {"input_ids": other, "attention_mask": mask, "loss_mask": loss_mask})
    assert float(same) == float(by_masks)


def test_readme_decoder_example():
    """The README's decoder example runs as written: the model learns to count."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Decoder language models", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict = {}
    exec(compile(block, "README decoder example", "exec"), namespace)
    assert float(namespace["metrics"]["loss"]) < 0.1
    np.testing.assert_array_equal(
        namespace["tokens"], [[10, 11, 12, 13, 14, 15], [45, 46, 47, 48, 49, 50]]
    )


def test_registered_names_build_hashable_models():
    """Every family is a registry name; a list of layer types still makes a hashable model
    (generate's compiled steps take the model as a static argument)."""
    for name in ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
        assert name in jft.models.names()
    sliding = ["sliding_attention"] * 2
    model = jft.models.get("gemma2", num_layers=2, layer_types=sliding)
    assert hash(model) == hash(jft.models.get("gemma2", num_layers=2, layer_types=tuple(sliding)))
    # config.model builds every model with num_classes: 0 is fine, a head is refused.
    assert jft.models.get("gpt2", num_classes=0).tie_word_embeddings
    for name in ("gpt2", "qwen3"):
        with pytest.raises(JftError, match="num_classes=3: a causal language model has no"):
            jft.models.get(name, num_classes=3)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A Llama folder whose large leaves pass FSDP's size floor, and its plain load."""
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(8)
    folder = tmp_path_factory.mktemp("wide_llama")
    _randomize(transformers.LlamaForCausalLM(config), 8).save_pretrained(folder)
    return folder, from_pretrained(folder)


def _mesh(shape, names):
    n = int(np.prod(shape))
    return jax.sharding.Mesh(np.asarray(jax.devices()[:n]).reshape(shape), names)


@pytest.mark.devices(8)
@pytest.mark.parametrize("layout", ["fsdp", "fsdp+tensor"])
def test_load_onto_mesh(wide_llama, layout):
    """Each tensor lands in its rule's sharding with the values of a plain load; FSDP gives
    the train step's own layout, so nothing moves when training starts."""
    from flax import traverse_util

    from jft.train import parallel
    from jft.weights import sharding

    folder, (_, plain) = wide_llama
    if layout == "fsdp":
        mesh = _mesh((8,), ("data",))
        rules = ((".*", sharding.FSDP),)
    else:  # heads and MLP units over "model", the rest FSDP over "data"
        mesh = _mesh((2, 4), ("data", "model"))
        rules = tuple(
            (p, jax.P("data", *s[1:]) if s and s[0] is None else s)
            for p, s in sharding.LLAMA_TENSOR_PARALLEL
        )
    _, variables = from_pretrained(folder, mesh=mesh, sharding_rules=rules)
    got = traverse_util.flatten_dict(variables, sep="/")
    want = traverse_util.flatten_dict(plain, sep="/")
    assert got.keys() == want.keys()
    if layout == "fsdp":
        expected = traverse_util.flatten_dict(
            parallel.state_shardings(plain, parallel.make_mesh(jax.devices()[:8]), fsdp=True),
            sep="/",
        )
        specs = {p: expected[p].spec for p in got}
    else:
        specs = {p: s.spec for p, s in sharding.rule_shardings(got, mesh, rules).items()}
        assert specs["params/backbone/layers_0/attention/q_proj/kernel"] == jax.P("data", "model")
        assert specs["params/backbone/layers_0/mlp/down_proj/kernel"] == jax.P("model", None)
    assert specs["params/backbone/embed_tokens/embedding"] != jax.P()
    assert specs["params/backbone/norm/scale"] == jax.P()
    for path, value in got.items():
        assert value.sharding.spec == specs[path], path
        assert value.sharding.mesh.shape == mesh.shape, path
        assert value.dtype == want[path].dtype
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path]), err_msg=path)


@pytest.mark.devices(8)
def test_load_onto_mesh_refuses_bad_rules_before_reading(wide_llama):
    folder, _ = wide_llama
    mesh, three = _mesh((8,), ("data",)), _mesh((3,), ("data",))
    cases = [
        (mesh, ((r"params/lm_head/.*", None),), r"no sharding rule matches params/backbone/"),
        (mesh, ((".*", jax.P("model")),), r"names mesh axes \['model'\]; the mesh has \('data',\)"),
        (
            mesh,
            ((".*", jax.P(None, None, "data")),),
            r"embedding has more entries than its shape \(512, 64\)",
        ),
        (three, ((".*norm.*", None), (".*", jax.P("data"))), r"dimension 0 of shape \(512, 64\)"),
    ]
    for mesh, rules, message in cases:
        with pytest.raises(WeightsError, match=message) as info:
            from_pretrained(folder, mesh=mesh, sharding_rules=rules)
        assert "\n" not in str(info.value)
