r"""ViT-B/16 on CIFAR-10 with LoRA: r=8 on every attention query and value, the rest frozen.

Weights: a timm ``vit_base_patch16_224`` file (``.safetensors``/``.bin``/``.npz``)
or a Hugging Face ``google/vit-base-patch16-224`` folder, given as the config's
argument or ``--config.init.path``. The adapters (295k values) and a new 10-way
head train with AdamW; the 85.8M base parameters hold no optimizer state and get
no kernel gradient (``benchmarks/lora.py``: 0.4 % of full fine-tuning's
optimizer state, 0.67x its FLOPs). ``jft export RUN DEST --format peft`` writes
the adapters as a PEFT folder that ``peft.PeftModel.from_pretrained`` loads onto
transformers' ``ViTForImageClassification``.

Run:

    jft train --config configs/vit_lora.py:/path/to/vit_b16.safetensors \
        --workdir runs/vit_lora --config.data.download=True

Result: not measured on our machines (no internet for CIFAR-10 or the weights,
and a CPU is too slow for ViT-B at 224); the configuration runs, two steps of it
in ``tests/test_recipes.py``.
"""

import ml_collections

from jft.train import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; ``arg``: the ViT-B/16 weights file or folder."""
    c = default_config()
    c.description = "ViT-B/16, LoRA r=8 on attention query/value, new head"
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
    c.lora.targets = (r"backbone/encoder/layer_\d+/attention/(query|value)",)
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.modules_to_save = ("head",)
    # Optimizer
    c.optimizer = ml_collections.ConfigDict({"name": "adamw", "lr": 1e-3, "weight_decay": 0.01})
    c.clip_grad_norm = 1.0
    # Schedule
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_steps = 200
    c.num_steps = 5_000
    c.eval_every = 1000
    c.log_every = 50
    # Checkpoints
    c.checkpoint.every = 1000
    return c
