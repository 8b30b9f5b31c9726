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
