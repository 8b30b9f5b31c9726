"""jft ResNet and VGG equal their PyTorch and Keras references, from every file format.

Reference models have random weights (nothing is downloaded); BatchNorm running
statistics are randomized before saving, so the ``batch_stats`` path is tested.
Each reference is saved in every format it comes in, read with
``jft.weights.read``, restored and compared in eval mode: max abs difference
<= 1e-4 in float32. The largest difference per architecture is printed at the
end of the module (``pytest -s``) and kept in ``MAX_DIFF``.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

import jft.models
import jft.weights
from tests.torch_refs import import_timm

TOL = 1e-4
MAX_DIFF: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_max_diff():
    yield
    print("\nlargest |jft - reference| per architecture:")
    for arch, d in sorted(MAX_DIFF.items()):
        print(f"  {arch:40s} {d:.3e}")


def _check(arch: str, ours, ref) -> None:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    d = float(np.abs(ours - ref).max())
    MAX_DIFF[arch] = max(MAX_DIFF.get(arch, 0.0), d)
    assert d <= TOL, f"{arch}: max abs difference {d:.3e} > {TOL}"


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    # Scales below 1 keep activations O(1) through 16 residual blocks, so the
    # absolute tolerance means the same thing at every depth.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.4 + 0.2)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.num_batches_tracked.fill_(7)


def _save_torch_formats(state_dict: dict, folder) -> dict[str, str]:
    sd = {k: v.contiguous() for k, v in state_dict.items()}
    paths = {f: str(folder / f"model.{f}") for f in ("pth", "safetensors", "npz")}
    torch.save(sd, paths["pth"])
    safetensors.torch.save_file(sd, paths["safetensors"])
    np.savez(paths["npz"], **{k: v.numpy() for k, v in sd.items()})
    return paths


def _images(shape, seed=0) -> np.ndarray:
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


_INIT_CACHE: dict = {}


def _restore(model, flat, arch, input_shape, **kwargs):
    # Modules are hashable dataclasses: compile each model's init once per session.
    key = (model, input_shape)
    if key not in _INIT_CACHE:
        _INIT_CACHE[key] = jax.jit(model.init)(jax.random.key(0), jnp.zeros(input_shape))
    variables, report = jft.weights.restore(_INIT_CACHE[key], flat, arch=arch, **kwargs)
    return variables, report


def _apply(model, variables, x, method="__call__"):
    """``model.apply`` compiled once per (model, method)."""
    key = (model, method)
    if key not in _APPLY_CACHE:
        _APPLY_CACHE[key] = jax.jit(lambda v, x: model.apply(v, x, method=method))
    return _APPLY_CACHE[key](variables, x)


_APPLY_CACHE: dict = {}


# --- timm ResNet -----------------------------------------------------------------


@pytest.fixture(scope="module", params=["resnet18", "resnet50"])
def timm_resnet(request, tmp_path_factory):
    timm = import_timm()
    torch.manual_seed(0)
    ref = timm.create_model(request.param, pretrained=False, num_classes=10).eval()
    _randomize_bn(ref)
    x = _images((2, 3, 64, 64))
    with torch.no_grad():
        logits = ref(torch.from_numpy(x)).numpy()
        feats = ref.forward_features(torch.from_numpy(x)).numpy()
    paths = _save_torch_formats(ref.state_dict(), tmp_path_factory.mktemp(request.param))
    return request.param, paths, x, logits, feats


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "npz"])
def test_timm_resnet(timm_resnet, fmt):
    name, paths, x, logits, feats = timm_resnet
    model = jft.models.get(name, num_classes=10)
    flat = jft.weights.read(paths[fmt])
    variables, report = _restore(model, flat, "resnet", (1, 64, 64, 3))
    assert not report.kept and not report.unused, report
    xh = x.transpose(0, 2, 3, 1)
    _check(f"timm {name}", _apply(model, variables, xh), logits)
    ours = _apply(model, variables, xh, "features")
    _check(f"timm {name} (feature map)", np.asarray(ours).transpose(0, 3, 1, 2), feats)


@pytest.mark.parametrize("timm_resnet", ["resnet18"], indirect=True)
def test_timm_resnet_new_head(timm_resnet):
    """A 10-class file into a 3-class model: skip keeps the new head from init."""
    name, paths, x, _, feats = timm_resnet
    model = jft.models.get(name, num_classes=3)
    flat = jft.weights.read(paths["safetensors"])
    variables, report = _restore(model, flat, "resnet", (1, 64, 64, 3), skip=["head/.*"])
    assert set(report.kept) == {"params/head/kernel", "params/head/bias"}
    # restore lists the skipped head's arrays from the file as unused.
    assert set(report.unused) == {"params/head/kernel", "params/head/bias"}
    ours = _apply(model, variables, x.transpose(0, 2, 3, 1), "features")
    _check(f"timm {name} (feature map)", np.asarray(ours).transpose(0, 3, 1, 2), feats)


# --- Hugging Face ResNet ----------------------------------------------------------

HF_CONFIGS = {
    "basic": dict(
        embedding_size=16,
        hidden_sizes=[16, 24, 32, 48],
        depths=[2, 1, 2, 1],
        layer_type="basic",
    ),
    # Bottleneck ResNet v1 (stride on the 1×1 conv) with a strided first stage,
    # and a stem narrower than the first stage: every HF option at once.
    "bottleneck-v1": dict(
        embedding_size=8,
        hidden_sizes=[32, 48, 64, 96],
        depths=[1, 2, 1, 1],
        layer_type="bottleneck",
        downsample_in_first_stage=True,
        downsample_in_bottleneck=True,
    ),
}


def _jft_from_hf_config(cfg, num_classes=0):
    return jft.models.get(
        "resnet",
        stage_sizes=cfg.depths,
        block=cfg.layer_type,
        widths=cfg.hidden_sizes,
        stem_width=cfg.embedding_size,
        first_stride=2 if cfg.downsample_in_first_stage else 1,
        stride_in_1x1=cfg.downsample_in_bottleneck,
        num_classes=num_classes,
    )


def _save_hf_formats(model, folder) -> dict[str, str]:
    """The folder layouts a Hugging Face model comes in."""
    paths = {}
    paths["safetensors"] = str(folder / "single")
    model.save_pretrained(paths["safetensors"])
    paths["sharded"] = str(folder / "sharded")
    model.save_pretrained(paths["sharded"], max_shard_size="100KB")
    assert os.path.exists(os.path.join(paths["sharded"], "model.safetensors.index.json"))
    # transformers 5 writes only safetensors; pytorch_model.bin is what older
    # versions wrote: torch.save of the state dict next to config.json.
    paths["bin"] = str(folder / "bin")
    shutil.copytree(paths["safetensors"], paths["bin"])
    os.remove(os.path.join(paths["bin"], "model.safetensors"))
    torch.save(model.state_dict(), os.path.join(paths["bin"], "pytorch_model.bin"))
    return paths


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_resnet(request, tmp_path_factory):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(num_labels=5, **HF_CONFIGS[request.param])
    ref = ResNetForImageClassification(cfg).eval()
    _randomize_bn(ref)
    x = _images((2, 3, 64, 64), seed=1)
    with torch.no_grad():
        out = ref(torch.from_numpy(x))
        base = ref.resnet(torch.from_numpy(x))
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    return {
        "name": request.param,
        "cfg": cfg,
        "x": x,
        "logits": out.logits.numpy(),
        "last_hidden_state": base.last_hidden_state.numpy(),
        "pooler_output": base.pooler_output.numpy(),
        "classifier": _save_hf_formats(ref, folder / "classifier"),
        "base": _save_hf_formats(ref.resnet, folder / "base"),
    }


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_hf_resnet_model(hf_resnet, fmt):
    """``ResNetModel``: last_hidden_state and pooler_output."""
    r = hf_resnet
    model = _jft_from_hf_config(r["cfg"], num_classes=0)
    flat = jft.weights.read(r["base"][fmt])
    variables, report = _restore(model, flat, "resnet", (1, 64, 64, 3))
    assert not report.kept and not report.unused, report
    xh = r["x"].transpose(0, 2, 3, 1)
    arch = f"HF ResNetModel {r['name']}"
    feats = _apply(model, variables, xh, "features")
    _check(arch, np.asarray(feats).transpose(0, 3, 1, 2), r["last_hidden_state"])
    _check(arch, _apply(model, variables, xh)[:, :, None, None], r["pooler_output"])


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_hf_resnet_for_image_classification(hf_resnet, fmt):
    r = hf_resnet
    model = _jft_from_hf_config(r["cfg"], num_classes=5)
    flat = jft.weights.read(r["classifier"][fmt])
    variables, report = _restore(model, flat, "resnet", (1, 64, 64, 3))
    assert not report.kept and not report.unused, report
    logits = _apply(model, variables, r["x"].transpose(0, 2, 3, 1))
    _check(f"HF ResNetForImageClassification {r['name']}", logits, r["logits"])


# --- timm and torchvision VGG-16 ---------------------------------------------------


@pytest.fixture(scope="module")
def timm_vgg16(tmp_path_factory):
    timm = import_timm()
    torch.manual_seed(0)
    ref = timm.create_model("vgg16", pretrained=False, num_classes=10).eval()
    x = _images((2, 3, 64, 64), seed=2)
    with torch.no_grad():
        logits = {s: ref(torch.from_numpy(x[:, :, :s, :s])).numpy() for s in (32, 35, 64)}
    paths = _save_torch_formats(ref.state_dict(), tmp_path_factory.mktemp("vgg16"))
    return paths, x, logits


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "npz"])
def test_timm_vgg16(timm_vgg16, fmt):
    """32×32 (a 1×1 map spread over 7×7), 35×35 (odd maps, 4×4 and 2×2 stages on
    the CPU's per-tap convolutions) and 64×64 (2×2 over 7×7, uneven bins)."""
    paths, x, logits = timm_vgg16
    model = jft.models.get("vgg16", num_classes=10, layout="timm")
    flat = jft.weights.read(paths[fmt])
    variables, report = _restore(model, flat, "vgg", (1, 32, 32, 3))
    assert not report.kept and not report.unused, report
    for s in (32, 35, 64):
        _check(
            "timm vgg16", _apply(model, variables, x[:, :, :s, :s].transpose(0, 2, 3, 1)), logits[s]
        )


def test_torchvision_vgg16(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.vgg16(weights=None, num_classes=10).eval()
    x = _images((2, 3, 64, 64), seed=3)
    with torch.no_grad():
        logits = ref(torch.from_numpy(x)).numpy()
        feats = ref.features(torch.from_numpy(x)).numpy()
    path = str(tmp_path / "vgg16.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    del ref
    model = jft.models.get("vgg16", num_classes=10, layout="torchvision")
    variables, report = _restore(model, jft.weights.read(path), "vgg", (1, 32, 32, 3))
    assert not report.kept and not report.unused, report
    xh = x.transpose(0, 2, 3, 1)
    _check("torchvision vgg16", _apply(model, variables, xh), logits)
    ours = _apply(model, variables, xh, "features")
    _check("torchvision vgg16 (feature map)", np.asarray(ours).transpose(0, 3, 1, 2), feats)


# --- Keras VGG16 -----------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_vgg16(tmp_path_factory):
    import keras

    assert keras.backend.backend() == "jax"
    folder = tmp_path_factory.mktemp("keras")
    keras.utils.set_random_seed(0)
    top = keras.applications.VGG16(
        weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None
    )
    # Random biases too: Keras initializes them to zero, which would hide a bias bug.
    for layer in top.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(np.random.RandomState(0).randn(*layer.bias.shape) * 0.1)
    notop = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    x = _images((2, 32, 32, 3), seed=4)
    paths = {
        "top.weights.h5": str(folder / "top.weights.h5"),
        "top.h5": str(folder / "top.h5"),
        "notop.weights.h5": str(folder / "notop.weights.h5"),
        "notop.h5": str(folder / "notop.h5"),
        "top.keras": str(folder / "top.keras"),
    }
    top.save_weights(paths["top.weights.h5"])
    top.save(paths["top.h5"])  # legacy Keras 2 layout: model_weights/<layer>/<layer>/kernel
    top.save(paths["top.keras"])
    notop.save_weights(paths["notop.weights.h5"])
    notop.save(paths["notop.h5"])
    return {
        "paths": paths,
        "x": x,
        "logits": np.asarray(top.predict(x, verbose=0)),
        "features": np.asarray(notop.predict(x, verbose=0)),
    }


@pytest.mark.parametrize("fmt", ["top.weights.h5", "top.h5", "top.keras"])
def test_keras_vgg16_include_top(keras_vgg16, fmt):
    k = keras_vgg16
    model = jft.models.get("vgg16", num_classes=10, layout="keras")
    flat = jft.weights.read(k["paths"][fmt])
    variables, report = _restore(model, flat, "vgg", (1, 32, 32, 3))
    assert not report.kept and not report.unused, report
    _check("keras VGG16 include_top", _apply(model, variables, k["x"]), k["logits"])


@pytest.mark.parametrize("fmt", ["notop.weights.h5", "notop.h5"])
def test_keras_vgg16_no_top(keras_vgg16, fmt):
    k = keras_vgg16
    model = jft.models.get("vgg16", include_top=False, num_classes=0, layout="keras")
    flat = jft.weights.read(k["paths"][fmt])
    variables, report = _restore(model, flat, "vgg", (1, 32, 32, 3))
    assert not report.kept and not report.unused, report
    _check(
        "keras VGG16 include_top=False",
        _apply(model, variables, k["x"], "features"),
        k["features"],
    )
    pooled = _apply(model, variables, k["x"])
    _check("keras VGG16 include_top=False", pooled, k["features"].mean(axis=(1, 2)))


# --- Small inputs, train mode and gradients: the CPU kernels against PyTorch -------
#
# Maps of a few pixels send every convolution through one of jft.ops's CPU
# formulations (per-tap matmuls onto <= 4x4 maps, strided convs with per-tap
# gradients, a stem over an image's 3 channels that keeps XLA's own). Each model
# is compared in eval mode, in train mode (batch statistics) and in the gradient
# of sum(logits * r) with respect to the input and every parameter. Gradients are
# compared relative to their largest entry: float32 sums differ with their order
# by ~1e-6 of it. A batch of 16 keeps train-mode BatchNorm on 1x1 maps well
# conditioned: over 4 values per channel PyTorch's own float32 gradient is 3e-4
# away from its float64 one, and jft's (CPU kernels or XLA's ops) as far.

GRAD_RTOL = 1e-4


def _torch_grads(ref, x, r):
    """Train-mode logits and the gradients of sum(logits * r) in the state dict's names."""
    ref.train()
    xt = torch.from_numpy(x).requires_grad_(True)
    logits = ref(xt)
    (logits * torch.from_numpy(r)).sum().backward()
    flat = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    flat.update({k: p.grad.numpy() for k, p in ref.named_parameters()})
    ref.zero_grad()
    ref.eval()
    return logits.detach().numpy(), flat, xt.grad.numpy()


def _jft_train_grads(model, variables, x, r):
    def loss(params, x):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        logits, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
        return jnp.sum(logits * r), logits

    (_, logits), (gp, gx) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
        variables["params"], x
    )
    return logits, gp, gx


def _check_grads(arch, ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (arch, ours.shape, ref.shape)
    d = float(np.abs(ours - ref).max()) / max(float(np.abs(ref).max()), 1e-30)
    MAX_DIFF[arch] = max(MAX_DIFF.get(arch, 0.0), d)
    assert d <= GRAD_RTOL, f"{arch}: max |jft - torch| / max |torch| = {d:.3e} > {GRAD_RTOL}"


def _compare_small(arch, model, ref, arch_map, x, num_classes, variables):
    """Eval logits, train logits and all gradients of ``model`` against ``ref``."""
    r = np.random.RandomState(1).randn(x.shape[0], num_classes).astype(np.float32)
    xh = x.transpose(0, 2, 3, 1)
    with torch.no_grad():
        _check(f"{arch} eval", _apply(model, variables, xh), ref(torch.from_numpy(x)).numpy())
    logits_t, grads_t, gx_t = _torch_grads(ref, x, r)
    logits, gp, gx = _jft_train_grads(model, variables, xh, r)
    _check(f"{arch} train", logits, logits_t)
    _check_grads(f"{arch} d/dinput", np.asarray(gx).transpose(0, 3, 1, 2), gx_t)
    expected, _ = arch_map(grads_t)
    for path, g in jax.tree_util.tree_leaves_with_path(gp):
        key = "params/" + "/".join(k.key for k in path)
        _check_grads(f"{arch} d/dparams", g, expected[key])


@pytest.mark.parametrize("size", [4])
def test_resnet18_small_inputs_against_timm(size):
    # 4x4 is issue 13's bug 2: the stem (3 channels, stride 2) returned a 4x4 map
    # instead of 2x2, 7e-4 away from PyTorch in eval mode. One size: each costs a
    # ResNet-18 train-step compile; odd maps are the CNN's and VGG's cases here
    # and tests/test_ops.py's for every op.
    timm = import_timm()
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    _randomize_bn(ref)
    model = jft.models.get("resnet18", num_classes=10)
    flat = {k: v.numpy() for k, v in ref.state_dict().items()}
    variables, _ = _restore(model, flat, "resnet", (1, 64, 64, 3))
    x = _images((16, 3, size, size), seed=size)
    _compare_small(
        f"timm resnet18 {size}x{size}",
        model,
        ref,
        jft.weights.keymaps.get("resnet"),
        x,
        10,
        variables,
    )


class _TorchCNN(torch.nn.Module):
    """jft.models.cnn in PyTorch: conv3x3-BN-ReLU stages, 2x2 max pools between
    (skipped once the map is narrower than 2), global average pool, head."""

    def __init__(self, widths, in_ch, num_classes):
        super().__init__()
        chans = [in_ch, *widths]
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(a, b, 3, padding=1, bias=False)
            for a, b in zip(chans[:-1], widths, strict=True)
        )
        self.bns = torch.nn.ModuleList(torch.nn.BatchNorm2d(w) for w in widths)
        self.head = torch.nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            if i and min(x.shape[2:]) >= 2:
                x = torch.nn.functional.max_pool2d(x, 2)
            x = torch.relu(bn(conv(x)))
        return self.head(x.mean((2, 3)))


def _cnn_map(flat):
    """_TorchCNN's state dict names -> jft CNN variable paths, kernels transposed."""
    mapped = {}
    for name, a in flat.items():
        kind, *rest = name.split(".")
        if kind == "head":
            mapped[f"params/head/{'kernel' if rest[0] == 'weight' else 'bias'}"] = (
                a.T if rest[0] == "weight" else a
            )
            continue
        i, leaf = int(rest[0]) + 1, rest[1]
        if kind == "convs":
            mapped[f"params/backbone/conv{i}/kernel"] = a.transpose(2, 3, 1, 0)
        elif leaf in ("weight", "bias"):
            mapped[f"params/backbone/bn{i}/{'scale' if leaf == 'weight' else 'bias'}"] = a
        elif leaf in ("running_mean", "running_var"):
            mapped[f"batch_stats/backbone/bn{i}/{leaf[8:]}"] = a
    return mapped, []


@pytest.mark.parametrize("size", [3, 4, 5, 8])
def test_cnn_small_inputs_against_torch(size):
    torch.manual_seed(0)
    ref = _TorchCNN((8, 16, 32), 1, 5).eval()
    _randomize_bn(ref)
    model = jft.models.get("cnn", widths=(8, 16, 32), num_classes=5, dropout_rate=0.0)
    mapped, _ = _cnn_map({k: v.numpy() for k, v in ref.state_dict().items()})
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    flat_paths = jax.tree_util.tree_leaves_with_path(template)
    assert {"/".join(k.key for k in p) for p, _ in flat_paths} == set(mapped)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, _: jnp.asarray(mapped["/".join(k.key for k in p)]), template
    )
    # Rounded inputs: ties in the max pools, where the gradient must go to the
    # first maximum as PyTorch's does.
    x = np.round(_images((4, 1, size, size), seed=size))
    _compare_small(f"cnn {size}x{size}", model, ref, _cnn_map, x, 5, variables)
