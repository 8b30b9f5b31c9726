"""QLoRA: LoRA on a frozen base stored as int8 or nf4 codes (jft.peft.quantize_base, via qwix)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

import jft.peft
import jft.train
from jft import partition, train
from jft.checkpoint import read_variables
from jft.peft import LoraConfig, LoraError
from jft.peft.quant import is_quantized, quantize
from tests.helpers import key, nbytes, perturbed, xent

# QLoRA's NormalFloat4 levels, as printed in Dettmers et al. (2023), appendix E.
NF4 = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
)  # fmt: skip


def _close(actual, desired):
    """Equal up to float32 rounding: the same products, which two XLA programs may fuse
    and sum in another order, differ by a few eps (1.2e-7) of the largest |value|; 4e-6
    of it is 32 eps (the merge below, a different product order, measured 1.3e-6)."""
    bound = 4e-6 * max(float(np.abs(desired).max()), 1e-30)
    np.testing.assert_allclose(actual, desired, atol=bound, rtol=0)


def _dequantized(params):
    """``params`` with every quantized kernel replaced by its float32 values."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict) and is_quantized(v):
            v = {**v, "kernel": jft.peft.dequantize(v["kernel"], v["kernel_scale"])}
            out[k] = {n: a for n, a in v.items() if n != "kernel_scale"}
        else:
            out[k] = _dequantized(v) if isinstance(v, dict) else v
    return out


class Mlp(nn.Module):
    """Dense and DenseGeneral layers whose input axes are multiples of nf4's block of 64."""

    depth: int = 2
    width: int = 128
    dtype: object = None

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(self.width, dtype=self.dtype, name="embed")(x)
        for i in range(self.depth):
            h = nn.DenseGeneral((2, self.width // 2), dtype=self.dtype, name=f"heads_{i}")(x)
            x = x + nn.Dense(self.width, dtype=self.dtype, name=f"mix_{i}")(
                nn.gelu(h.reshape(*h.shape[:-2], self.width))
            )
        return nn.Dense(3, dtype=self.dtype, name="head")(x.mean(axis=1))


class Block(nn.Module):
    """A Conv, a DenseGeneral and a Dense whose first axes are not multiples of 64."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(6, (3, 3), strides=(2, 2), padding="SAME", name="conv")(x)
        x = nn.DenseGeneral((2, 4), name="heads")(x.reshape(x.shape[0], -1, 6))
        return nn.Dense(3, name="head")(nn.relu(x.reshape(*x.shape[:-2], 8))).mean(axis=1)


def _mlp(depth=2, width=128):
    model = Mlp(depth=depth, width=width)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, 64)), jnp.float32)
    return model, model.init(key(), x), x


# ----------------------------------------------------------------------------- the codes


def test_int8_is_absmax_per_output_feature():
    w = np.random.default_rng(1).normal(size=(3, 3, 5, 7)).astype(np.float32)  # a conv kernel
    q = quantize(w, "int8")
    codes, scale = np.asarray(q["kernel"]), np.asarray(q["kernel_scale"])
    assert codes.dtype == np.int8 and codes.shape == w.shape and scale.shape == (1, 1, 1, 7)
    deq = np.asarray(jft.peft.dequantize(q["kernel"], q["kernel_scale"]))
    np.testing.assert_array_equal(deq, codes.astype(np.float32) * scale)
    # rounding to the nearest code (a column's absmax sits at +-127.5: a tie, within float error)
    assert np.all(np.abs(deq - w) <= scale / 2 * (1 + 1e-4))
    absmax = np.abs(w).reshape(-1, 7).max(axis=0)
    np.testing.assert_allclose(scale.ravel(), absmax / 127.5, rtol=1e-6)  # qwix: qmax + 1/2
    assert set(np.abs(codes.astype(np.int32)).reshape(-1, 7).max(axis=0)) <= {127, 128}


def test_nf4_is_qloras_normal_float_in_blocks_of_64_two_codes_a_byte():
    w = np.random.default_rng(2).normal(size=(128, 2, 3)).astype(np.float32)
    q = quantize(w, "nf4")
    assert q["kernel"].dtype == jnp.uint8 and q["kernel"].shape == (64, 2, 3)
    assert q["kernel"].nbytes == w.size // 2 and q["kernel_scale"].shape == (2, 2, 3)
    deq = np.asarray(jft.peft.dequantize(q["kernel"], q["kernel_scale"]))
    # The reference, from the paper's definition: each block of 64 weights along the
    # first axis is scaled by its absmax and rounded to the nearest NF4 level.
    blocks = w.reshape(2, 64, 2, 3)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    levels = NF4[np.abs(blocks[..., None] / absmax[..., None] - NF4).argmin(axis=-1)]
    np.testing.assert_allclose(deq, (levels * absmax).reshape(w.shape), rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(q["kernel_scale"]), absmax[:, 0], rtol=1e-6)
    assert quantize(w[:48], "nf4") is None  # not a whole number of blocks: stays float
    with pytest.raises(LoraError, match="lora.quantize='fp8' is unknown"):
        quantize(w, "fp8")


# ----------------------------------------------------------------------------- the adapted model


@pytest.mark.parametrize("kind,variant", [("int8", "dora"), ("nf4", "lora")])
def test_qlora_equals_lora_on_the_dequantized_base_and_merges(kind, variant):
    model, variables, x = _mlp()
    config = LoraConfig(targets=(r"heads_\d", "mix_1"), rank=4, alpha=8, variant=variant)
    lora = jft.peft.lora(model, config)
    params = perturbed(jft.peft.init_adapters(lora, variables, x)["params"], scale=0.3)
    q = jft.peft.quantize_base(params, kind, skip=["head"])
    for name in ("embed", "heads_0", "mix_0", "mix_1"):
        assert is_quantized(q[name]) and q[name]["kernel"].dtype.itemsize == 1, name
    assert q["head"]["kernel"].dtype == jnp.float32 and "kernel_scale" not in q["head"]
    np.testing.assert_array_equal(q["heads_0"]["lora_A"], params["heads_0"]["lora_A"])
    ref = _dequantized(q)
    refit = jft.peft.reset_magnitudes(q, config)  # as a run does after quantizing
    assert all(is_quantized(refit[m]) for m in ("embed", "heads_0", "mix_0")), "left quantized"

    run = jax.jit(lambda p: lora.apply({"params": p}, x))
    out = run(q)
    _close(out, run(ref))
    assert np.max(np.abs(out - run(params))) > 1e-5  # it is quantized

    @jax.jit
    def grads(p):  # of the adapters and the head
        base = jft.peft.strip_adapters(p)
        trained = partition.merge(jft.peft.adapters(p), {"head": base.pop("head")})
        loss = lambda t: jnp.sum(lora.apply({"params": partition.merge(base, t)}, x) ** 2)
        return jax.grad(loss)(trained)

    jax.tree.map(_close, grads(q), grads(ref))
    merged = jft.peft.merge(q, config)  # in float32, from the dequantized base
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(merged)) and not any(
        "kernel_scale" in m for m in merged.values()
    )
    # Merged x (W + s A B) against x W + s (x A) B: another order of the same sums.
    _close(jax.jit(model.apply)({"params": merged}, x), out)
    with pytest.raises(LoraError, match="quantized already"):
        jft.peft.quantize_base(q, kind)


def test_int8_covers_conv_and_dense_general_and_nf4_leaves_small_axes_float():
    model = Block()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 5)), jnp.float32)
    variables = model.init(key(), x)
    config = LoraConfig(targets=("conv", "heads"), rank=2, alpha=4)
    lora = jft.peft.lora(model, config)
    params = perturbed(jft.peft.init_adapters(lora, variables, x)["params"], scale=0.3)
    q = jft.peft.quantize_base(params, "int8")
    assert all(is_quantized(q[m]) for m in ("conv", "heads", "head"))
    out = lora.apply({"params": q}, x)
    _close(out, lora.apply({"params": _dequantized(q)}, x))
    _close(model.apply({"params": jft.peft.merge(q, config)}, x), out)
    assert not any(is_quantized(m) for m in jft.peft.quantize_base(params, "nf4").values())


def test_a_quantized_kernel_outside_dense_and_conv_is_one_line():
    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x @ self.param("kernel", nn.initializers.ones, (64, 4))

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="proj")(Custom(name="mine")(x))

    x = jnp.ones((1, 64))
    model = Outer()
    lora = jft.peft.lora(model, LoraConfig(targets=("proj",)))
    params = jft.peft.init_adapters(lora, model.init(key(), x), x)["params"]
    q = jft.peft.quantize_base(params, "int8")
    with pytest.raises(LoraError, match="mine: a Custom holds a quantized kernel.*skip it") as e:
        lora.apply({"params": q}, x)
    assert "\n" not in str(e.value)
    with pytest.raises(LoraError, match="lora.quantize='int4' is unknown"):
        LoraConfig(targets=("proj",), quantize="int4")


# ----------------------------------------------------------------------------- the train step


def test_the_step_trains_adapters_and_keeps_no_float_copy_of_the_base():
    """The compiled step's buffers: codes in place of kernels, and no float kernels kept."""
    model, variables, x = _mlp(depth=6, width=256)
    batch = {"x": x, "label": jnp.asarray([0, 1, 2, 0], jnp.int32)}
    config = LoraConfig(targets=(r"heads_\d",), rank=4, alpha=8)
    lora = jft.peft.lora(model, config)
    params = jft.peft.init_adapters(lora, variables, x)["params"]
    rules = jft.peft.adapter_rules(optax.adam(1e-2), also=["head/.*"])
    kernels = sum(params[m]["kernel"].nbytes for m in params if m != "head")

    def compiled(p, **kwargs):
        state = train.create_train_state({"params": jax.tree.map(jnp.array, p)}, rules)
        step = train.make_train_step(lora, rules, xent, jit=False, norms=False, **kwargs)
        return state, jax.jit(step, donate_argnums=0).lower(state, batch).compile()

    float_state, float_step = compiled(params)
    q = jft.peft.quantize_base(params, "int8", skip=["head"])
    state, step = compiled(q)
    assert nbytes(float_state.frozen) - nbytes(state.frozen) > 0.7 * kernels
    mem, float_mem = step.memory_analysis(), float_step.memory_analysis()
    assert mem.argument_size_in_bytes < float_mem.argument_size_in_bytes - 0.7 * kernels
    # Each layer dequantizes its kernel in the forward pass and again in the backward
    # pass (jft.peft.quant.apply_quantized): a layer or two of float kernels live at once,
    # where keeping the forward's copies for the backward pass would add all of them.
    extra = mem.temp_size_in_bytes - float_mem.temp_size_in_bytes
    print(f"\ntemp bytes: float base {float_mem.temp_size_in_bytes:,}, int8 base "
          f"{mem.temp_size_in_bytes:,}; float kernels {kernels:,}")  # fmt: skip
    assert extra < 0.3 * kernels

    frozen = jax.tree.map(np.array, state.frozen)
    for _ in range(3):
        state, metrics = step(state, batch)
    assert np.isfinite(metrics["loss"]) and np.any(state.trainable["heads_0"]["lora_B"])
    jax.tree.map(np.testing.assert_array_equal, state.frozen, frozen)
    bf16 = train.make_train_step(lora, rules, xent, compute_dtype=jnp.bfloat16)
    state, metrics = bf16(state, batch)  # dequantized straight to bfloat16
    assert np.isfinite(metrics["loss"])


# ----------------------------------------------------------------------------- a run


def _run(steps, **overrides):
    c = jft.train.default_config()
    c.data.name, c.data.keep_classes, c.data.batch_size = "digits", (0, 1, 2, 3, 4), 32
    c.model = ml_collections.ConfigDict(
        dict(name="vit", image_size=8, patch_size=4, hidden_size=64, num_layers=1, num_heads=2)
    )
    c.model.mlp_dim, c.model.num_classes = 64, 5
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "lr": 1e-2})
    c.num_steps, c.log_every, c.eval_every, c.checkpoint.every = steps, 2, 0, 2
    c.progress = False
    c.lora.targets = (r"backbone/encoder/layer_\d+/attention/(query|value)",)
    for k, v in overrides.items():
        group, _, leaf = k.rpartition(".")
        (c[group] if group else c.lora)[leaf] = v
    return c


def test_config_lora_quantize_runs_resumes_exactly_and_exports_merged(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("JFT_DATA_DIR", os.environ.get("JFT_DATA_DIR", str(tmp_path / "tfds")))
    base = jft.train.config.build_model(jft.train.config.resolve(_run(1, targets=())), 5)
    variables = jax.jit(base.init)(key(3), jnp.zeros((1, 8, 8, 1)))
    jft.weights.save_checkpoint(tmp_path / "base", variables)  # a "pretrained" base
    run = lambda steps: _run(steps, quantize="nf4", **{"init.path": str(tmp_path / "base")})
    jft.train.train_and_evaluate(run(4), tmp_path / "whole")
    jft.train.train_and_evaluate(run(2), tmp_path / "resumed")
    jft.train.train_and_evaluate(run(4), tmp_path / "resumed")  # from its step 2
    read = lambda run: flatten_dict(read_variables(tmp_path / run)[0], sep="/")
    whole, resumed = read("whole"), read("resumed")
    assert whole.keys() == resumed.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name], resumed[name], err_msg=name)
    # The checkpoint holds the adapters and the head, not the (quantized) base.
    assert not any(k.endswith("kernel_scale") for k in whole)
    assert "params/backbone/encoder/layer_0/attention/query/lora_B" in whole
    assert not any(k.endswith("attention/key/kernel") for k in whole)

    from jft import cli

    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "whole")]) == 0
    out = capsys.readouterr().out  # nf4 codes counted as weights (two a byte), scales not
    assert "layer_0/attention/query  kernel 64x64  r=8" in out, out
    params = sum(v.size for v in jax.tree.leaves(variables["params"]))
    line = next(x for x in out.splitlines() if x.startswith("trainable:"))
    assert f" of {params + 2 * 2 * 64 * 8:,} " in line, line  # + A and B on query and value

    dest = tmp_path / "merged.npz"
    jft.train.export(tmp_path / "whole", dest, merge=True)
    merged = dict(np.load(dest))
    query = merged["params/backbone/encoder/layer_0/attention/query/kernel"]
    assert query.dtype == np.float32 and query.shape == (64, 64)
    assert not any("lora_" in k or k.endswith("kernel_scale") for k in merged)

    with pytest.raises(LoraError, match="lora.quantize='int4' is unknown"):
        jft.train.config.resolve(_run(1, quantize="int4"))


def test_a_llama_with_an_nf4_base_equals_its_dequantized_self():
    """Every decoder projection (jft.ops.dot_general's dense layers) runs from nf4 codes."""
    model = jft.models.get(
        "llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
        num_heads=2, num_kv_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 6)), jnp.int32)
    lora = jft.peft.lora(model, LoraConfig(targets=(r".*attention/(q_proj|v_proj)",), rank=4))
    params = perturbed(jft.peft.init_adapters(lora, model.init(key(), ids), ids)["params"])
    q = jft.peft.quantize_base(params, "nf4")
    quantized = [k for k, m in jft.peft.quant._modules(q) if is_quantized(m)]
    assert len(quantized) == 8, quantized  # q, k, v, o, gate, up, down and lm_head
    run = jax.jit(lambda p: lora.apply({"params": p}, ids))
    _close(run(q), run(_dequantized(q)))
