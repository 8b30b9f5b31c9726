"""``train_and_evaluate`` and ``evaluate``: what ``jft train`` and ``jft eval`` run.

:func:`train_and_evaluate` takes a recipe's config in one of three shapes:

- a run config (:func:`jft.train.default_config`'s keys): one run,
  :func:`jft.train.loop.train`;
- a staged config (``config.stages``): its runs in order,
  :func:`jft.train.stages.run_stages`;
- a program (``config.program = "module:function"``): a study with keys of its
  own, run by the function the recipe names, called as ``function(config,
  workdir)``. The recipe, not the trainer, says which code runs it, as a
  console-script entry point does: a new study needs no branch here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from jft.train import checkpoint as ckpt_lib
from jft.train import config as config_lib
from jft.train import loop, resume, stages
from jft.train.experiment import Experiment
from jft.train.parallel import Parallel

__all__ = ["evaluate", "program", "train_and_evaluate"]

Program = Callable[[ml_collections.ConfigDict, str], dict[str, Any]]


def program(name: str) -> Program:
    """The function a ``config.program`` entry point (``"module:function"``) names.

    Raises:
      jft.train.ConfigError: ``name`` is not ``module:function``, or does not import.
    """
    module, _, attr = str(name).partition(":")
    hint = "give 'module:function', e.g. 'jft.train.quadratic:run_quadratic'"
    if not module or not attr:
        raise config_lib.ConfigError(f"config key 'program' is {name!r}; {hint}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise config_lib.ConfigError(
            f"config key 'program' is {name!r}, which does not import ({e}); {hint}"
        ) from None
    if not callable(fn):
        raise config_lib.ConfigError(f"config key 'program' is {name!r}, not a function; {hint}")
    return fn


def train_and_evaluate(
    config: Mapping[str, Any] | ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, Any]:
    """Trains and evaluates ``config`` in ``workdir``; what ``jft train`` runs.

    Starts from, in this order: the workdir's own latest checkpoint; else
    ``config.resume``; else the pretrained weights at ``config.init.path``; else
    scratch. SIGTERM saves a checkpoint and returns (with ``"preempted"`` in the
    result); the same call then resumes.

    Args:
      config: a config of :func:`jft.train.config.default_config`'s keys (a recipe's
        ``get_config()``), a staged config (``config.stages``), or a program
        (``config.program``, see the module).
      workdir: where checkpoints, ``metrics.jsonl``, ``tb/`` and ``plots/`` go.

    Returns:
      The final metrics (``eval/accuracy``, ``train/loss``, ``steps_per_sec``...);
      for a staged config, a dict of them by stage; for a program, what it returns.

    Raises:
      jft.train.ConfigError, jft.data.DataError, jft.weights.WeightsError,
      jft.train.CheckpointError: a user mistake, with a one-line message.
      NonFiniteError: ``config.max_nonfinite_steps`` steps in a row had NaN/Inf
        gradients.
    """
    if config.get("program"):
        run = program(config["program"])
        return run(ml_collections.ConfigDict(config), os.fspath(workdir))
    if "stages" in config and config["stages"]:
        config = ml_collections.ConfigDict(config)
        config_lib.validate_stages(config)  # every stage, before the first one runs
        return stages.run_stages(config, os.fspath(workdir))
    return loop.train(config_lib.resolve(config), os.fspath(workdir))


def evaluate(workdir: str | os.PathLike, *, step: int | None = None) -> dict[str, Any]:
    """Evaluates a run's checkpoint on its eval split, with the config stored in it.

    Args:
      workdir: a run's folder (or its ``checkpoints`` folder).
      step: the checkpoint to evaluate; the latest by default.

    Returns:
      The eval metrics (``accuracy``, ``loss``, ``f1``, ``confusion_matrix``...).
    """
    directory = ckpt_lib.checkpoint_dir(workdir)
    exp = Experiment.build(config_lib.resolve(ckpt_lib.read_config(directory, step=step)))
    ck = ckpt_lib.Checkpointer(directory, every=0, frozen_base=resume.frozen_base(exp.config))
    restored = ck.restore(exp.state(resume.initial_variables(exp)), step=step)
    ck.close()
    par = Parallel("none")
    out = exp.evaluate(exp.eval_step(par), restored.state, par)
    out["step"] = int(restored.step)
    return out
