r"""Supervised fine-tuning of a Qwen2/2.5/3 model on a JSONL file of prompts or chats.

The Llama-family recipe (``configs/llama_sft.py``: model, weights, tokenizer and
chat template from the folder; completion-only loss; packed rows) with Qwen's
module names for LoRA.

Run (``:lora`` for LoRA on q/v, ``:frozen`` to freeze the embeddings):

    jft train --config configs/qwen_sft.py --config.init.path=FOLDER \
        --config.data.path=FILE.jsonl --workdir runs/qwen_sft

Result: not measured here (no Qwen weights on our machines).
"""

import ml_collections
from jft.configs.llama_sft import sft_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe; ``arg``: ``full`` (default), ``lora``, ``frozen`` or the model folder."""
    return sft_config(
        arg,
        description="Qwen SFT",
        lora_targets=(r"backbone/.*attention/(q_proj|v_proj)",),
        embeddings=r"backbone/embed_tokens/.*",
    )
