r"""Supervised fine-tuning of a Llama-family model (Llama, Mistral, Qwen, Gemma) on a JSONL file.

The model, its weights, tokenizer and chat template all come from one Hugging
Face folder (``config.init.path``; nothing is downloaded); the data are a JSONL
file of ``{"prompt", "completion"}`` or chat ``{"messages": [...]}`` lines
(:mod:`jft.data.sft`). Only the completions / assistant messages count in the
loss, and examples are packed into rows of ``data.max_length`` tokens without
attending across examples. The last 5% of the file is the eval split.

Run (full fine-tuning; ``configs/llama_sft.py:lora`` trains LoRA adapters on q/v
only, ``:frozen`` freezes the token embeddings, ``:FOLDER`` sets the folder):

    jft train --config configs/llama_sft.py --config.init.path=FOLDER \
        --config.data.path=FILE.jsonl --workdir runs/llama_sft

Result: not measured here (no Llama weights on our machines); tests/test_sft.py
checks one step's loss against transformers on a tiny random Llama.
"""

import ml_collections

from jft.train import default_config

MODES = ("full", "lora", "frozen")


def sft_config(
    arg: str | None,
    *,
    description: str,
    lora_targets: tuple[str, ...],
    embeddings: str,
) -> ml_collections.ConfigDict:
    """The SFT recipe every ``configs/*_sft.py`` shares.

    Args:
      arg: ``"full"`` (default), ``"lora"``, ``"frozen"``, or the model folder.
      description: what the run is.
      lora_targets: module path regexes of the LoRA adapters for ``"lora"``.
      embeddings: the regex of the embedding parameters ``"frozen"`` freezes.
    """
    mode, path = (arg, "") if arg in MODES else ("full", arg or "")
    c = default_config()
    c.description = f"{description}, {mode}"
    folder = ml_collections.FieldReference(path, field_type=str)
    # Data
    c.data.name = "sft"
    c.data.tokenizer = folder  # the model folder's, unless set
    c.data.train_split = "train[:95%]"
    c.data.eval_split = "train[95%:]"
    c.data.max_length = 1024
    c.data.packing = True
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    # Model
    c.model = ml_collections.ConfigDict({"name": "pretrained"})  # init.path's config.json
    c.init.path = folder
    c.init.skip = ()
    c.init.required = True
    # Optimizer
    c.optimizer = ml_collections.ConfigDict({"name": "adamw", "lr": 2e-5, "weight_decay": 0.0})
    c.loss = ml_collections.ConfigDict({"name": "causal_lm_xent", "label_smoothing": 0.0})
    c.clip_grad_norm = 1.0
    if mode == "lora":
        c.lora.targets = lora_targets
        c.lora.modules_to_save = ()
        c.optimizer.lr = 2e-4
    if mode == "frozen":
        c.frozen = (embeddings,)
    # Schedule
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_steps = 30
    c.num_steps = 1000
    c.log_every = 10
    c.eval_every = 200
    # Checkpoints
    c.checkpoint.every = 200
    c.checkpoint.best_metric = "eval/loss"
    c.checkpoint.best_mode = "min"
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; ``arg``: ``full`` (default), ``lora``, ``frozen`` or the model folder."""
    return sft_config(
        arg,
        description="Llama-family SFT",
        lora_targets=(r"backbone/.*attention/(q_proj|v_proj)",),
        embeddings=r"backbone/embed_tokens/.*",
    )
