"""Export a run's model (no optimizer state) for inference and sharing, in any format.

A thin layer over :func:`jft.weights.export`: it resolves a run's workdir or
checkpoint directory to its variables (the latest good step, ``step``, or with
``best`` the saved step that evaluated best), the model its config builds (for a
Hugging Face ``config.json``) and the Hugging Face folder it was initialized from
(``config.init.path``: its config, tokenizer and sentence-transformers files
travel with the export). A LoRA run's adapters are merged into the base model
with ``merge`` (:func:`jft.peft.merge`, float32).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from jft import peft, weights
from jft.train import config as config_lib
from jft.train.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    is_checkpoint_dir,
    read_config,
    read_metadata,
    read_params,
)
from jft.train.logging import read_metrics

__all__ = ["export"]

_BY_SUFFIX = {".safetensors": "safetensors", ".npz": "npz"}


def export(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    format: str | None = None,
    step: int | None = None,
    dtype: str | None = None,
    labels: Sequence[str] | None = None,
    like: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    merge: bool = False,
    best: bool = False,
) -> str:
    """Writes the model variables of a run (or of any weights ``src``) to ``dst``.

    Without ``format`` the format follows ``dst``'s name, as before:

    - ``*.safetensors``: one file, arrays named by their jft paths
      (``params/backbone/conv1/kernel``, ``batch_stats/backbone/bn1/mean``);
    - ``*.npz``: the same names in a NumPy archive;
    - anything else: an orbax folder of ``{"params": ..., "batch_stats": ...}``.

    With ``format`` (``"hf"``, ``"timm"``, ``"torchvision"``, ``"keras"``...) the
    variables go back to a source framework's format; see :func:`jft.weights.export`.
    Read jft's own formats back with ``jft.weights.read(dst)`` and
    ``jft.weights.restore(variables, flat, arch="jft")``. BatchNorm statistics are
    included: inference needs them.

    Args:
      src: a run's workdir or checkpoint directory; or anything
        :func:`jft.weights.export` takes (a weights file, a Hugging Face folder).
      dst: the file or folder to create.
      format: see :data:`jft.weights.export.FORMATS`; None: by ``dst``'s suffix;
        ``"peft"``: a LoRA run's adapters as a Hugging Face PEFT folder.
      step: the step to export instead of the latest.
      merge: a LoRA run's adapters merged into their kernels (in float32, see
        :func:`jft.peft.merge`): the full base model, which any ``format`` takes.
        Without it a LoRA run exports only to jft's own formats or ``"peft"``.
      best: the saved step whose evaluation of ``config.checkpoint.best_metric``
        in the run's ``metrics.jsonl`` is best (``best_mode``), not the latest.
      dtype, labels, max_shard_size, overwrite: see :func:`jft.weights.export`.
      like: a Hugging Face folder for ``config.json`` and tokenizer; default: the
        run's ``config.init.path`` when it is one.

    Returns:
      The absolute path written.

    Raises:
      CheckpointError: ``dst`` exists, no step of ``src`` can be read, ``best``
        finds no evaluated step, ``merge`` finds no adapters (one line).
      WeightsError: the export itself does not fit (one line, nothing written).
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointError(f"{dst}: already exists; pass --overwrite to replace it")
    if format is None:
        format = _BY_SUFFIX.get(os.path.splitext(dst)[1].lower(), "orbax")
    if best:
        if step is not None:
            raise CheckpointError("give a step (--step N) or --best, not both")
        if not _is_run(src):
            raise CheckpointError(f"{src}: --best picks a run's best step; give a workdir")
        step = _best_step(src)
    if format == "peft":
        if merge:
            raise CheckpointError("--format peft writes the adapters alone; drop --merge")
        return _export_peft(src, dst, step)
    kwargs: dict[str, Any] = dict(
        dtype=dtype, labels=labels, max_shard_size=max_shard_size, overwrite=overwrite
    )
    if not _is_run(src):
        if merge:
            raise CheckpointError(f"{src}: --merge merges a LoRA run's adapters; give a workdir")
        return weights.export(src, dst, format, like=like, **kwargs)
    lora = _run_lora(src, step)  # checked before the checkpoint is read
    if lora is None and merge:
        raise CheckpointError(f"{src}: --merge merges LoRA adapters, and the run has none")
    if lora is not None and not merge and format not in ("safetensors", "npz", "orbax"):
        raise CheckpointError(
            f"{src}: the run trains LoRA adapters; pass --merge to export the base model "
            "with them merged, or --format peft for the adapters alone"
        )
    variables = read_params(src, step=step)
    model, init_folder = _run_model(src, step, variables)
    if merge and isinstance(model, peft.LoraModel):
        variables, model = _merged(variables, model)
    like = like if like is not None else init_folder
    return weights.export(variables, dst, format, model=model, like=like, **kwargs)


def _export_peft(src: str | os.PathLike, dst: str, step: int | None) -> str:
    """A LoRA run's adapters and ``lora.modules_to_save`` as a PEFT folder (:mod:`jft.peft`)."""
    from flax import traverse_util

    if not _is_run(src):
        raise CheckpointError(f"{src}: --format peft writes a LoRA run's adapters; give a workdir")
    config = config_lib.resolve(read_config(src, step=step))
    lora = config_lib.lora_config(config)
    if lora is None:
        raise CheckpointError(
            f"{src}: the run has no adapters (its config.lora.targets is empty); "
            "export it with --format hf"
        )
    flat = read_params(src, step=step)
    params = traverse_util.unflatten_dict(
        {k.removeprefix("params/"): v for k, v in flat.items() if k.startswith("params/")},
        sep="/",
    )
    head = flat.get("params/head/kernel")
    model = config_lib.build_model(config, 0 if head is None else int(head.shape[-1]))
    saved = [m for m in config.lora.modules_to_save if f"params/{m}/kernel" in flat]
    peft.save_adapter(
        dst,
        params,
        lora,
        peft.arch_of(model),
        modules_to_save=saved,
        base_model_name_or_path=config.init.path or None,
    )
    return dst


def _run_lora(src: str | os.PathLike, step: int | None) -> peft.LoraConfig | None:
    """The run's :class:`jft.peft.LoraConfig`; None without adapters or a readable config."""
    try:
        return config_lib.lora_config(ml_collections.ConfigDict(read_config(src, step=step)))
    except (config_lib.ConfigError, KeyError, AttributeError, TypeError):
        return None


def _merged(variables: dict[str, Any], model: peft.LoraModel) -> tuple[dict[str, Any], Any]:
    """The variables with each adapter merged into its kernel, and the base model."""
    from flax import traverse_util

    params = traverse_util.unflatten_dict(
        {k.removeprefix("params/"): v for k, v in variables.items() if k.startswith("params/")},
        sep="/",
    )
    merged = traverse_util.flatten_dict(peft.merge(params, model.config), sep="/")
    out = {k: v for k, v in variables.items() if not k.startswith("params/")}
    out.update({f"params/{k}": np.asarray(v) for k, v in merged.items()})
    return out, model.base


def _best_step(src: str | os.PathLike) -> int:
    """The saved step of a run whose ``config.checkpoint.best_metric`` evaluation is best.

    The evaluations are the run's ``metrics.jsonl`` records (``best_mode`` says
    whether larger is better); only steps with a checkpoint count.

    Raises:
      CheckpointError: no checkpoint, no best metric configured, or no saved
        step evaluated (one line).
    """
    directory = checkpoint_dir(src)
    config = read_config(directory)
    metric = (config.get("checkpoint") or {}).get("best_metric")
    mode = (config.get("checkpoint") or {}).get("best_mode", "max")
    if not metric:
        raise CheckpointError(
            f"{src}: the run tracks no best metric (config checkpoint.best_metric is empty); "
            "pass --step N"
        )
    steps = set(read_metadata(directory).steps)
    workdir = os.path.dirname(directory) if os.path.basename(directory) == "checkpoints" else src
    evals = {
        int(r["step"]): float(r[metric])
        for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
        if r.get("step") in steps and isinstance(r.get(metric), (int, float))
    }
    if not evals:
        raise CheckpointError(
            f"{src}: no saved step ({', '.join(map(str, sorted(steps)))}) has an {metric} "
            "evaluation in metrics.jsonl; pass --step N"
        )
    pick = max if mode == "max" else min
    return pick(sorted(evals), key=evals.__getitem__)


def _is_run(src: str | os.PathLike) -> bool:
    """A workdir or checkpoint directory (also one without a finished step: its error says so)."""
    path = os.fspath(src)
    if is_checkpoint_dir(path):
        return True
    weights_like = os.path.isfile(os.path.join(path, "config.json")) or not os.path.isdir(path)
    return not weights_like


def _run_model(
    src: str | os.PathLike, step: int | None, variables: dict[str, Any]
) -> tuple[Any, str | None]:
    """The model the run's stored config builds and its HF init folder; (None, None) if none."""
    try:
        config = ml_collections.ConfigDict(read_config(src, step=step))
        head = variables.get("params/head/kernel")
        model = config_lib.build_model(config, 0 if head is None else int(head.shape[-1]))
    except (CheckpointError, config_lib.ConfigError, KeyError, AttributeError, TypeError):
        return None, None  # an orbax folder of variables, or a config without a model
    init = str(config.get("init", {}).get("path", "") or "")
    folder = init if os.path.isfile(os.path.join(init, "config.json")) else None
    return model, folder
