"""Import PyTorch reference libraries (timm, torchvision) for the equivalence tests.

The PyPI torchvision 0.28.0 wheel, the release built for torch 2.13.0, links its
C++ ops (``_C.so``) against CUDA torch, so they cannot load on the CPU build of
torch that the tests use. torchvision tolerates a missing ``_C`` but then fails
while registering fake kernels for ops that were never defined. We define those
op schemas (no kernels) before importing it: timm's ResNet and VGG use none of
these ops, and any call to one would raise instead of computing something wrong.
"""

import importlib.util
import os
import sys

import numpy as np
import torch

_TORCHVISION_OPS = [
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
    "float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
    "SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
    "float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
    "SymInt channels, SymInt height, SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, "
    "Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
    "SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, "
    "bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
]
_LIB = None


def _define_torchvision_ops_if_missing() -> None:
    """Defines torchvision's op schemas unless its own ``_C`` extension loads."""
    global _LIB
    if _LIB is not None or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise ImportError("torchvision is missing: install jft with the [test] extra")
    ext = os.path.join(os.path.dirname(spec.origin), "_C.so")
    try:
        torch.ops.load_library(ext)
        return  # a working build: nothing to do
    except (OSError, RuntimeError):
        pass
    _LIB = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_OPS:
        _LIB.define(schema)


def import_timm():
    """Returns the ``timm`` module, importable on the CPU build of torch."""
    _define_torchvision_ops_if_missing()
    import timm

    return timm


# --------------------------------------------------------------------------- shared test helpers
# The transformer equivalence tests (test_bert_vit.py, test_from_pretrained.py) use these.

TOL = 1e-4
"""Largest abs difference allowed between jft and the reference, float32, eval mode."""

BERT_CFG = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
VIT_CFG = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and BatchNorm statistics, norm scales around 1, so every mapping matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # Convs: std 1/sqrt(fan-in), so that activations keep their scale with depth.
            std = 0.2 if p.ndim < 4 else p[0].numel() ** -0.5
            noise = torch.randn(p.shape, generator=g) * std
            is_scale = p.ndim == 1 and "norm" in name.lower() and name.endswith("weight")
            p.copy_(noise + 1.0 if is_scale else noise)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return module.eval()


def report(arch: str, diff: float) -> None:
    """Prints a difference for the closing note (``pytest -s``)."""
    print(f"[max-diff] {arch}: {diff:.2e}")


def max_diff(a, b) -> float:
    """The largest absolute difference, in float32."""
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def text_batch(seed: int = 0):
    """Ids, a padding mask with rows of different lengths, and non-zero segment ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, size=(3, 12))
    lengths = np.array([12, 7, 3])
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
    types = (np.arange(12)[None] >= lengths[:, None] // 2).astype(np.int64) * mask
    return ids * mask, mask, types


def images(n: int = 2, size: int = 32, seed: int = 0):
    """The same random images as NHWC numpy (jft) and NCHW torch (reference)."""
    x = np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)
    return x, torch.tensor(x.transpose(0, 3, 1, 2))


def state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A torch module's state dict as numpy arrays."""
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}
