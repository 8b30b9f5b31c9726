"""Every key of a run config with its default, and the error a config that breaks them raises.

A recipe names only what it changes; :func:`jft.train.config.resolve` lays it
over :func:`default_config`. ``model`` and ``optimizer`` are open groups: their
keys besides ``name`` are the keyword arguments of ``jft.models.get(name, ...)``
and ``jft.optim.<name>(...)``.
"""

from __future__ import annotations

import ml_collections

from jft import data
from jft.errors import JftError

__all__ = ["EVAL_METRICS", "OPEN_GROUPS", "ConfigError", "default_config"]

# Groups whose keys are another function's arguments, checked when it is called.
OPEN_GROUPS = ("model", "optimizer", "distributed")

# The scalar metrics the eval step reports (``top_5`` when there are >= 5 classes).
EVAL_METRICS = (
    "eval/accuracy",
    "eval/f1",
    "eval/loss",
    "eval/precision",
    "eval/recall",
    "eval/top_5",
)


class ConfigError(JftError, ValueError):
    """A config that cannot run; the one-line message names the key."""


def default_config() -> ml_collections.ConfigDict:
    """Every key of a single run, with its default (the digits CNN from scratch)."""
    c = ml_collections.ConfigDict()
    c.description = ""  # what the run is, for tables
    c.seed = 0

    # Data
    c.data = data.default_config()

    # Model
    c.model = ml_collections.ConfigDict({"name": "cnn"})
    c.init = ml_collections.ConfigDict()
    c.init.path = ""  # weights file/folder, a jft workdir or checkpoint, or "stage:<name>"
    c.init.arch = ""  # key map; inferred from the file when empty
    c.init.skip = ("head/.*",)  # deliberately new parameters: keep their init values
    c.init.strict = True  # every parameter not skipped must be in the file
    c.init.required = False  # a recipe that needs pretrained weights: empty init.path is an error

    # Optimizer
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "lr": 1e-3})
    c.frozen = ()  # regexes of frozen parameters, e.g. ("backbone/.*",); matched first
    # Partition rules after `frozen`, first match wins: (regex, settings) pairs, settings a dict
    # over config.optimizer's keys (any argument of its rule) or None to freeze; what no rule
    # claims trains with config.optimizer. E.g. (("head/.*", {"lr": 1e-2}),
    # (".*(bias|scale)", {"weight_decay": 0.0})).
    c.rules = ()
    # Layer-wise LR decay (jft.layerwise): block i of num_layers trains at
    # lr * decay ** (num_layers - i), the embeddings at lr * decay ** (num_layers + 1).
    c.layerwise_lr = ml_collections.ConfigDict()
    c.layerwise_lr.decay = 1.0  # 1.0: off
    c.layerwise_lr.num_layers = 0  # the model's transformer blocks (6 for MiniLM-L6)
    c.layerwise_lr.layer_prefix = "backbone/encoder/layer_"
    c.layerwise_lr.embeddings = "backbone/embeddings/.*"  # "": none
    # LoRA (jft.peft): on when lora.targets names modules; then only the adapters and
    # lora.modules_to_save train, and the rest is a frozen base.
    c.lora = ml_collections.ConfigDict()
    c.lora.targets = ()  # regexes of module paths, e.g. (r"backbone/.*attention/(query|value)",)
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.variant = "lora"  # lora | rslora | dora | rsdora
    c.lora.modules_to_save = ("head",)  # module paths trained whole next to the adapters
    c.lora.quantize = ""  # "" | int8 | nf4: the frozen base's kernels quantized (QLoRA)
    c.clip_grad_norm = 0.0  # 0: no clipping; else by the norm of all trainable parameters
    c.loss = ml_collections.ConfigDict({"name": "softmax_xent", "label_smoothing": 0.0})

    # Schedule
    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "constant"  # constant | cosine | warmup_cosine | linear
    c.schedule.warmup_steps = 0
    c.schedule.end_factor = 0.0  # final lr as a fraction of the peak (cosine, linear)

    # Training
    c.num_steps = 500
    c.parallel = "jit"  # jit | pmap | none
    c.fsdp = False
    c.grad_accum_steps = 1
    c.compute_dtype = "float32"  # float32 | bfloat16
    c.max_nonfinite_steps = 10
    c.log_every = 10
    c.eval_every = 100
    c.progress = True
    c.distributed = ml_collections.ConfigDict()  # coordinator_address, num_processes, process_id

    # Checkpoints
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100  # 0: only at the end
    c.checkpoint.keep = 3
    c.checkpoint.best_metric = "eval/accuracy"
    c.checkpoint.best_mode = "max"
    c.checkpoint.async_save = True
    c.resume = ""  # a workdir or checkpoint folder to start from when the workdir has none
    return c
