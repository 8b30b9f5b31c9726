r"""Supervised fine-tuning of GPT-2 on a JSONL file of prompts and completions.

The recipe of ``configs/llama_sft.py`` (model, weights and tokenizer from the
folder; completion-only loss; packed rows) with GPT-2's module names. GPT-2's
tokenizer has no chat template: use ``{"prompt", "completion"}`` lines, or set
``config.data.chat_template``. Rows stay within GPT-2's 1024 positions.

Run (``:lora`` for LoRA on the fused q/k/v projection, ``:frozen`` to freeze the
token and position embeddings):

    jft train --config configs/gpt2_sft.py --config.init.path=FOLDER \
        --config.data.path=FILE.jsonl --workdir runs/gpt2_sft

Result: not measured here (no GPT-2 weights on our machines).
"""

import ml_collections
from jft.configs.llama_sft import sft_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; ``arg``: ``full`` (default), ``lora``, ``frozen`` or the model folder."""
    return sft_config(
        arg,
        description="GPT-2 SFT",
        lora_targets=(r"backbone/.*attn/c_attn",),
        embeddings=r"backbone/(wte|wpe)/.*",
    )
