r"""ViT-B/16 fine-tuned on CIFAR-10 at 224×224 from timm or Hugging Face weights.

Weights: a timm ``vit_base_patch16_224`` file (``.safetensors``/``.bin``/``.npz``)
or a Hugging Face ``google/vit-base-patch16-224`` folder, given as the config's
argument or ``--config.init.path``. The head is new; everything trains, with SGD
momentum, warmup and a cosine decay, gradient clipping at 1 (the ViT paper's
fine-tuning recipe). On a TPU or GPU add ``--config.compute_dtype=bfloat16``.

Run:

    jft train --config configs/vit_b16_cifar10.py:/path/to/vit_b16.safetensors \
        --workdir runs/vit_cifar10 --config.data.download=True

Result: not measured on our machines (no internet for CIFAR-10 or the weights;
a CPU is too slow for ViT-B at 224); the ViT paper reports ~0.98-0.99.
"""

import ml_collections

from jft.train import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; ``arg``: the ViT-B/16 weights file or folder."""
    c = default_config()
    c.description = "ViT-B/16, all layers, new head"
    # Data
    c.data.name = "cifar10"
    c.data.batch_size = 128
    c.data.eval_batch_size = 256
    c.data.preprocess = "resize(224)|flip_lr|normalize(0.5, 0.5)"
    c.data.num_workers = 4
    # Model
    c.model = ml_collections.ConfigDict({"name": "vit_b16", "num_classes": 10})
    c.init.path = arg or ""
    c.init.arch = "vit"
    c.init.skip = ("head/.*",)
    c.init.required = True
    # Optimizer
    c.optimizer = ml_collections.ConfigDict({"name": "heavy_ball", "lr": 0.01, "momentum": 0.9})
    c.clip_grad_norm = 1.0
    # Schedule
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_steps = 500
    c.num_steps = 10_000
    c.eval_every = 1000
    c.log_every = 50
    # Checkpoints
    c.checkpoint.every = 1000
    return c
