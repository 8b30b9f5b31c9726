r"""Keras's transfer classic on MNIST: a frozen VGG-16 conv base, Flatten, Dense 1024, Dense 10.

The conv base is loaded from VGG-16 weights you have (Keras
``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``, a torchvision
``vgg16-*.pth`` or timm weights), given as the config's argument or
``--config.init.path``; the digits are made 3-channel and 32×32. MNIST is a tfds
catalog data set: prepare it once with ``--config.data.download=True``.

Run:

    jft train --config configs/mnist_vgg16_frozen.py:/path/to/vgg16_notop.h5 \
        --workdir runs/mnist_vgg16 --config.data.download=True

Result: not measured on our machines (no internet for MNIST or the weights);
this set-up is known to reach ~0.98 test accuracy within an epoch.
"""

import ml_collections

from jft.train import default_config

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; ``arg``: the VGG-16 weights file."""
    c = default_config()
    c.description = "frozen VGG-16 conv base, Flatten, Dense 1024, Dense 10"
    # Data
    c.data.name = "mnist"
    c.data.batch_size = 128
    c.data.eval_batch_size = 500
    c.data.preprocess = f"gray_to_rgb|resize(32)|normalize({IMAGENET_MEAN}, {IMAGENET_STD})"
    # Model
    c.model = ml_collections.ConfigDict(
        {"name": "vgg16_flatten", "hidden": 1024, "num_classes": 10}
    )
    c.init.path = arg or ""
    c.init.arch = "vgg"
    c.init.skip = ("fc/.*", "head/.*")  # new layers on top of the conv base
    c.init.required = True
    # Optimizer
    c.frozen = ("backbone/.*",)
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "lr": 1e-3})
    # Schedule
    c.schedule.name = "constant"
    c.num_steps = 1000
    c.eval_every = 250
    c.log_every = 50
    # Checkpoints
    c.checkpoint.every = 250
    return c
