"""Where a run starts: the resume order, written down in one place.

The workdir's own latest checkpoint (a restarted run); else ``config.resume``
(continue another run's checkpoint here); else the pretrained init
(``config.init.path``); else scratch.

A LoRA run's checkpoints hold the adapters, not the frozen base
(:mod:`jft.checkpoint.base`): they restore onto the pretrained base, loaded first.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax

from jft import peft, weights
from jft.train import checkpoint as ckpt_lib
from jft.train import config as config_lib
from jft.train.experiment import Experiment
from jft.train.state import TrainState

__all__ = ["Start", "frozen_base", "initial_variables", "start"]


@dataclasses.dataclass
class Start:
    """The state a run starts from, and where it came from.

    Attributes:
      state: the single-copy train state (not yet placed on devices).
      step: the steps it has taken.
      data_state: the train pipeline's state saved with a checkpoint, else ``None``.
      origin: what it was restored from, for the log.
    """

    state: TrainState
    step: int
    data_state: Any
    origin: str


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _pretrained(variables: dict[str, Any], config: Any) -> dict[str, Any]:
    path = config.init.path
    if ckpt_lib.is_checkpoint_dir(path):
        flat = ckpt_lib.read_params(path)
        arch = "jft"
    else:
        flat = weights.read(path)
        arch = config.init.arch or weights.infer_arch(flat)
    variables, report = weights.restore(
        variables,
        flat,
        arch,
        skip=config_lib.init_skip(config),
        strict=config.init.strict,
        source=path,
    )
    _log(f"init from {path}: {str(report).splitlines()[0]}")
    lora = config_lib.lora_config(config)
    if lora is not None:  # DoRA's magnitudes start at the norms of the weights just loaded
        variables = {**variables, "params": peft.reset_magnitudes(variables["params"], lora)}
    return variables


def frozen_base(config: Any) -> str | None:
    """The base a LoRA run's checkpoints name instead of holding it: ``config.init.path``
    (``""`` for a random init); None when LoRA is off and checkpoints hold everything."""
    if config_lib.lora_config(config) is None:
        return None
    return os.path.abspath(config.init.path) if config.init.path else ""


def initial_variables(exp: Experiment) -> dict[str, Any]:
    """The variables a run's state is built on: init, with the pretrained base of a LoRA run."""
    variables = exp.init_variables()
    if frozen_base(exp.config):  # an adapter-only checkpoint restores onto its base
        variables = _pretrained(variables, exp.config)
    lora = config_lib.lora_config(exp.config)
    if lora is not None and lora.quantize:  # QLoRA: the same codes on every load, so one hash
        skip = [re.escape(m) for m in exp.config.lora.modules_to_save]
        params = peft.quantize_base(variables["params"], lora.quantize, skip=skip)
        # DoRA's magnitudes: the norms of the dequantized kernels, as PEFT's QLoRA
        variables = {**variables, "params": peft.reset_magnitudes(params, lora)}
    return variables


def start(exp: Experiment, ckpt: ckpt_lib.Checkpointer) -> Start:
    """The state ``exp``'s run starts from, in the resume order (see the module)."""
    config = exp.config
    variables = initial_variables(exp)
    latest = ckpt.latest_step()
    if latest is not None:
        restored = ckpt.restore(exp.state(variables))
        origin = f"its checkpoint at step {latest}"
    elif config.resume:
        other = ckpt_lib.Checkpointer(
            ckpt_lib.checkpoint_dir(config.resume), every=0, frozen_base=frozen_base(config)
        )
        restored = other.restore(exp.state(variables))
        other.close()
        origin = f"config.resume={config.resume}"
    elif config.init.path:
        state = exp.state(variables if frozen_base(config) else _pretrained(variables, config))
        return Start(state, 0, None, f"pretrained {config.init.path}")
    else:
        return Start(exp.state(variables), 0, None, "scratch")
    return Start(restored.state, int(restored.step), restored.data_state or None, origin)
