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
        logits = {s: ref(torch.from_numpy(x[:, :, :s, :s])).numpy() for s in (32, 64)}
    paths = _save_torch_formats(ref.state_dict(), tmp_path_factory.mktemp("vgg16"))
    return paths, x, logits


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "npz"])
def test_timm_vgg16(timm_vgg16, fmt):
    """32×32 (a 1×1 map spread over 7×7) and 64×64 (2×2 over 7×7, uneven bins)."""
    paths, x, logits = timm_vgg16
    model = jft.models.get("vgg16", num_classes=10, layout="timm")
    flat = jft.weights.read(paths[fmt])
    variables, report = _restore(model, flat, "vgg", (1, 32, 32, 3))
    assert not report.kept and not report.unused, report
    for s in (32, 64):
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
