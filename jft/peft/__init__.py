"""Parameter-efficient fine-tuning: LoRA, rsLoRA and DoRA on a frozen base, as PEFT folders.

>>> import jax, jax.numpy as jnp, optax
>>> import jft.models, jft.peft
>>> base = jft.models.get("bert", num_classes=2, vocab_size=50, hidden_size=16,
...                       num_layers=1, num_heads=2, intermediate_size=32)
>>> ids = jnp.ones((1, 4), jnp.int32)
>>> variables = base.init(jax.random.key(0), ids)
>>> config = jft.peft.LoraConfig(targets=("backbone/.*attention/(query|value)",), rank=4)
>>> model = jft.peft.lora(base, config)
>>> variables = jft.peft.init_adapters(model, variables, ids)
>>> rules = jft.peft.adapter_rules(optax.adam(1e-3), also=["head/.*"])
>>> jft.peft.resolve_targets(variables["params"], config)
('backbone/encoder/layer_0/attention/query', 'backbone/encoder/layer_0/attention/value')
"""

from jft.peft.config import (
    ADAPTER_LEAVES,
    ADAPTER_REGEX,
    VARIANTS,
    LoraConfig,
    LoraError,
    adapter_rules,
    adapters,
    resolve_targets,
    strip_adapters,
)
from jft.peft.hf import arch_of, load_adapter, save_adapter
from jft.peft.lora import LoraModel, check_targets, init_adapters, lora
from jft.peft.merge import delta, merge, reset_magnitudes, unmerge
from jft.peft.quant import QUANTIZE, bits_per_weight, dequantize, quantize_base
from jft.peft.summary import AdapterSummary, summarize, summarize_arrays

__all__ = [
    "ADAPTER_LEAVES",
    "ADAPTER_REGEX",
    "QUANTIZE",
    "VARIANTS",
    "AdapterSummary",
    "LoraConfig",
    "LoraError",
    "LoraModel",
    "adapter_rules",
    "adapters",
    "arch_of",
    "bits_per_weight",
    "check_targets",
    "delta",
    "dequantize",
    "init_adapters",
    "load_adapter",
    "lora",
    "merge",
    "quantize_base",
    "reset_magnitudes",
    "resolve_targets",
    "save_adapter",
    "strip_adapters",
    "summarize",
    "summarize_arrays",
    "unmerge",
]
