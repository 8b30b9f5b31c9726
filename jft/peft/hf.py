"""Adapters as Hugging Face PEFT folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

The tensor names are the ones PEFT gives the transformers twin of the model
(``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``),
found through the architecture's key-map table (:mod:`jft.weights.keymaps`), so
a folder written here loads with ``peft.PeftModel.from_pretrained(model,
folder)`` and a folder that PEFT saved loads here. Shapes are PyTorch's:
``lora_A.weight`` ``(r, in)`` (a ``Conv2d``: ``(r, in, kh, kw)``),
``lora_B.weight`` ``(out, r)`` (``(out, r, 1, 1)``), DoRA's
``lora_magnitude_vector`` ``(out,)`` (``(1, out, 1, 1)``). A trained head goes
in ``modules_to_save`` (``classifier``).

The module names are those of the model as transformers builds it in memory;
for ViT that is transformers 5's (``vit.layers.0.attention.q_proj``), and the
older ``vit.encoder.layer.0.attention.attention.query`` names load too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jft.peft.config import LoraConfig, LoraError, resolve_targets
from jft.weights.keymaps import bert, vit
from jft.weights.keymaps._table import Rule, Table
from jft.weights.readers import read_safetensors
from jft.weights.writers import write_safetensors

__all__ = ["ARCHS", "CONFIG_NAME", "WEIGHTS_NAME", "arch_of", "load_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModel's names for the wrapped model's modules


def _exported(rules: Sequence[Rule]) -> tuple[Rule, ...]:
    return tuple(dataclasses.replace(r, alias=False) for r in rules)


# arch -> (rules PEFT names are written with, rules also read, the prefix of a model with a head)
ARCHS: dict[str, tuple[tuple[Rule, ...], tuple[Rule, ...], str]] = {
    "bert": (tuple(bert.RULES), (), bert.HEAD_PREFIX),
    "vit": (
        # transformers 5 names ViT's layers ``layers.N.attention.q_proj`` in memory
        _exported(r for r in vit.HF_RULES if r.alias)
        + tuple(r for r in vit.HF_RULES if not r.alias and not r.src.startswith("encoder.")),
        tuple(r for r in vit.HF_RULES if not r.alias and r.src.startswith("encoder.")),
        vit.HEAD_PREFIX,
    ),
}
"""The architectures whose adapters travel as PEFT folders."""


def arch_of(model: Any) -> str:
    """The :data:`ARCHS` name of a jft model (a :class:`~jft.peft.LoraModel`'s base).

    Raises:
      LoraError: a model whose adapters have no PEFT module names.
    """
    from jft import models

    base = getattr(model, "base", model)
    kinds = {models.Bert: "bert", models.ViT: "vit"}
    arch = next((a for cls, a in kinds.items() if isinstance(base, cls)), None)
    if arch is None:
        raise LoraError(
            f"{type(base).__name__} adapters have no PEFT module names; PEFT folders are "
            f"written for {sorted(ARCHS)}"
        )
    return arch


def _arch(arch: str) -> tuple[tuple[Rule, ...], tuple[Rule, ...], str]:
    if arch not in ARCHS:
        raise LoraError(f"arch={arch!r} has no PEFT module names; use one of {sorted(ARCHS)}")
    return ARCHS[arch]


def _module(params: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    node = params
    for key in path.split("/"):
        node = node[key]
    return node


def _to_torch(table: Table, module: str, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """jft leaves of ``module`` -> PyTorch names and layouts; a LoraError if it has no name."""
    flat, unused = table.inverse({f"params/{module}/{k}": v for k, v in tensors.items()})
    if unused or not flat:
        raise LoraError(
            f"{module}: no module of the transformers model corresponds to it; its adapter "
            "cannot be written as a PEFT folder (narrow lora.targets)"
        )
    return flat


def save_adapter(
    folder: str | os.PathLike,
    params: Mapping[str, Any],
    config: LoraConfig,
    arch: str,
    *,
    modules_to_save: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Writes the adapters of ``params`` as a PEFT folder (created if needed).

    Args:
      folder: the destination folder.
      params: the parameters with adapters.
      config: their :class:`~jft.peft.LoraConfig`.
      arch: the key map that names the modules (one of :data:`ARCHS`).
      modules_to_save: jft module paths saved whole (PEFT's ``modules_to_save``);
        default: ``("head",)`` when ``params`` has a head, else none.
      base_model_name_or_path: written to the config, for ``AutoPeftModel``.

    Raises:
      LoraError: an adapted module without adapter parameters, or one the
        transformers model has no name for.
    """
    rules, _, head_prefix = _arch(arch)
    table = Table(rules, prefix=head_prefix if "head" in params else "")
    tensors: dict[str, np.ndarray] = {}
    targets = []
    for path in resolve_targets(params, config):
        module = _module(params, path)
        if "lora_A" not in module:
            raise LoraError(f"{path} has no adapter parameters; run jft.peft.init_adapters first")
        a, b = np.asarray(module["lora_A"], np.float32), np.asarray(module["lora_B"], np.float32)
        conv = a.ndim > 2
        ((name_a, torch_a),) = _to_torch(table, path, {"kernel": a}).items()
        b_kernel = b.reshape((1,) * (a.ndim - 2) + b.shape) if conv else b
        ((_, torch_b),) = _to_torch(table, path, {"kernel": b_kernel}).items()
        name = name_a.rsplit(".", 1)[0]
        targets.append(name)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = torch_a
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = torch_b
        if config.use_dora:
            m = np.asarray(module["lora_magnitude"], np.float32)
            shape = (1, m.size) + (1,) * (a.ndim - 2) if conv else m.shape
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = m.reshape(shape)
    if modules_to_save is None:
        modules_to_save = ("head",) if "head" in params else ()
    saved = []
    for path in modules_to_save:
        module = {k: np.asarray(v) for k, v in _module(params, path).items()}
        flat = _to_torch(table, path, module)
        saved.append(next(iter(flat)).rsplit(".", 1)[0].removeprefix(table.prefix))
        tensors.update({f"{_PREFIX}{k}": v for k, v in flat.items()})
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, WEIGHTS_NAME), tensors, metadata={"format": "pt"})
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "modules_to_save": saved or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(peft_config, f, indent=2)


def _read_config(folder: str) -> LoraConfig:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise LoraError(f"{path} is missing: {folder} is not a PEFT adapter folder")
    with open(path) as f:
        cfg = json.load(f)
    unsupported = {
        "peft_type": (cfg.get("peft_type"), "LORA"),
        "bias": (cfg.get("bias", "none"), "none"),
        "fan_in_fan_out": (cfg.get("fan_in_fan_out", False), False),
        "rank_pattern": (cfg.get("rank_pattern") or {}, {}),
        "alpha_pattern": (cfg.get("alpha_pattern") or {}, {}),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise LoraError(f"{path}: {key}={value!r} is not supported; jft reads {wanted!r}")
    dora, rs = bool(cfg.get("use_dora")), bool(cfg.get("use_rslora"))
    variant = {(False, False): "lora", (False, True): "rslora", (True, False): "dora"}.get(
        (dora, rs), "rsdora"
    )
    return LoraConfig(
        targets=(".*",),  # replaced by the modules the file holds
        rank=int(cfg["r"]),
        alpha=float(cfg.get("lora_alpha", 8)),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        variant=variant,
    )


def _check(name: str, value: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != tuple(shape):
        raise LoraError(
            f"{name}: shape {tuple(value.shape)} in the file, {tuple(shape)} in the model; "
            "the adapter was made for another base"
        )


def load_adapter(
    folder: str | os.PathLike, params: Mapping[str, Any], arch: str
) -> tuple[dict[str, Any], LoraConfig]:
    """Reads a PEFT folder into ``params``: returns (params with adapters, the config).

    The returned config's ``targets`` are the exact paths of the adapted modules.
    Tensors of ``modules_to_save`` (a trained head) replace the model's.

    Raises:
      LoraError: a folder that is not a LoRA adapter, an option jft does not
        support, a tensor name no module of ``arch`` has, or a shape that differs
        from the model's (both shapes named).
    """
    folder = os.fspath(folder)
    config = _read_config(folder)
    rules, also, head_prefix = _arch(arch)
    flat = read_safetensors(os.path.join(folder, WEIGHTS_NAME))
    names = {k.removeprefix(_PREFIX): np.asarray(v) for k, v in flat.items()}
    prefix = head_prefix if any(n.startswith(head_prefix) for n in names) else ""
    table = Table(rules + _exported(also), prefix=prefix)
    adapters: dict[str, dict[str, np.ndarray]] = {}
    whole: dict[str, np.ndarray] = {}
    suffixes = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B"}
    suffixes[".lora_magnitude_vector"] = "lora_magnitude"
    for name, value in names.items():
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None:
            whole[name] = value
            continue
        module = name.removesuffix(suffix)
        mapped, unused = table.forward({f"{module}.weight": value})
        if unused:
            raise LoraError(f"{_PREFIX}{name}: no module of {arch} is named {module!r}")
        ((path, v),) = mapped.items()
        path = path.removeprefix("params/").removesuffix("/kernel")
        adapters.setdefault(path, {})[suffixes[suffix]] = v
    out = _copy_tree(params)
    for path, leaves in adapters.items():
        try:
            module = _module(out, path)
        except KeyError:
            raise LoraError(f"{path}: the adapter names a module the model does not have") from None
        kernel = np.shape(module["kernel"])
        a, b, r = leaves["lora_A"], leaves["lora_B"], config.rank
        if a.ndim > 2:  # a conv: B is stored as a 1x1 kernel
            b = b.reshape(b.shape[-2:])
            _check(f"{path}/lora_A", a, (*kernel[:-1], r))
            _check(f"{path}/lora_B", b, (r, kernel[-1]))
        elif len(kernel) == 2:
            _check(f"{path}/lora_A", a, (kernel[0], r))
            _check(f"{path}/lora_B", b, (r, kernel[1]))
        elif a.shape[-1] != r or b.shape[0] != r or a.shape[0] * b.shape[1] != np.prod(kernel):
            raise LoraError(
                f"{path}: lora_A {a.shape} and lora_B {b.shape} do not fit kernel {kernel} at "
                f"rank {r}; the adapter was made for another base"
            )
        module["lora_A"], module["lora_B"] = a, b
        if config.use_dora:
            module["lora_magnitude"] = leaves["lora_magnitude"].reshape(-1)
    if whole:
        mapped, unused = table.forward(whole)
        if unused:
            raise LoraError(f"{_PREFIX}{unused[0]}: no parameter of {arch} has this name")
        for p, v in mapped.items():
            module_path, leaf = p.removeprefix("params/").rsplit("/", 1)
            module = _module(out, module_path)
            _check(p, v, np.shape(module[leaf]))
            module[leaf] = v
    targets = tuple(re.escape(p) for p in adapters)
    return out, dataclasses.replace(config, targets=targets)


def _copy_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
