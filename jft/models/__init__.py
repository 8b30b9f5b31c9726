"""Flax linen models whose parameter trees load pretrained weights.

Every model is built by name with :func:`get` and takes ``num_classes`` and a
compute ``dtype`` (parameters stay float32). ``model.apply(variables, x,
train=False)`` runs in eval mode; ``train=True`` turns on dropout (rng
``"dropout"``) and BatchNorm batch statistics (``mutable=["batch_stats"]``).
The trunk lives under ``backbone/`` and the classifier under ``head/``;
transformer blocks are ``backbone/encoder/layer_{i}``. Models with BatchNorm take
``frozen_bn``: regexes over BatchNorm module paths whose layers always use their
running statistics (see CONTRIBUTING.md for all conventions).
"""

from jft.models import cnn, generate, gpt2, layers, llama, mlp, resnet, vgg  # noqa: F401  (registers the models)
from jft.models.bert import Bert, BertOutput
from jft.models.cnn import CNN
from jft.models.frozen_bn import frozen_bn_patterns
from jft.models.gpt2 import GPT2
from jft.models.layers import compiler_options
from jft.models.llama import Llama
from jft.models.mlp import MLP
from jft.models.registry import MODELS, get, names, register
from jft.models.resnet import ResNet, resnet18, resnet34, resnet50
from jft.models.vgg import VGG, VGGFlattenHead, vgg16, vgg16_flatten
from jft.models.vit import ViT, resize_pos_embed

__all__ = [
    "MODELS",
    "Bert",
    "BertOutput",
    "CNN",
    "GPT2",
    "Llama",
    "MLP",
    "ResNet",
    "VGG",
    "VGGFlattenHead",
    "ViT",
    "compiler_options",
    "frozen_bn_patterns",
    "generate",
    "get",
    "names",
    "register",
    "resize_pos_embed",
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg16",
    "vgg16_flatten",
]
