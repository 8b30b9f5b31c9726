r"""ResNet-18 from torchvision or timm weights, frozen trunk, a new 10-way head on CIFAR-10.

The weights come from a file you have: a torchvision ``resnet18-*.pth``, a timm
``.safetensors``/``.bin`` or a Hugging Face folder; give it as the config's
argument or as ``--config.init.path``. CIFAR-10 is a tfds catalog data set:
prepare it once with ``--config.data.download=True`` on a machine with internet.

Run:

    jft train --config configs/cifar10_resnet18_finetune.py:/path/to/resnet18.pth \
        --workdir runs/cifar10_r18 --config.data.download=True

Then unfreeze everything at a lower rate from that run:

    jft train --config configs/cifar10_resnet18_finetune.py:/path/to/resnet18.pth \
        --workdir runs/cifar10_r18_all --config.frozen='()' --config.optimizer.lr=1e-4 \
        --config.init.path=runs/cifar10_r18 --config.init.skip='()'

Result: not measured on our machines (no internet for CIFAR-10 or the weights);
a linear probe on ImageNet ResNet-18 features at 64×64 is known to reach ~0.80.
"""

import ml_collections

from jft.train import default_config

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; ``arg``: the ResNet-18 weights file or folder."""
    c = default_config()
    c.description = "ResNet-18, frozen trunk, new head"
    # Data
    c.data.name = "cifar10"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.batch_size = 128
    c.data.eval_batch_size = 500
    c.data.preprocess = (
        f"resize(64)|random_crop(64, pad=4)|flip_lr|normalize({IMAGENET_MEAN}, {IMAGENET_STD})"
    )
    c.data.num_workers = 2
    # Model
    c.model = ml_collections.ConfigDict({"name": "resnet18", "num_classes": 10})
    c.init.path = arg or ""
    c.init.arch = "resnet"
    c.init.skip = ("head/.*",)
    c.init.required = True
    # Optimizer
    c.frozen = ("backbone/.*",)  # the trunk: no optimizer state, no backward pass
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "lr": 1e-3})
    # Schedule
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_steps = 100
    c.num_steps = 2000
    c.eval_every = 500
    c.log_every = 50
    # Checkpoints
    c.checkpoint.every = 500
    return c
