"""Fill a model's variables from a flat checkpoint, with a report of what happened."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from jft.weights import keymaps
from jft.weights.errors import WeightsError

__all__ = [
    "RestoreReport",
    "WeightsError",
    "check_finite",
    "check_layout",
    "infer_arch",
    "keymap",
    "restore",
]


@dataclasses.dataclass(frozen=True)
class RestoreReport:
    """What :func:`restore` did.

    Attributes:
      loaded: variable paths (``params/backbone/...``) filled from the file.
      kept: variable paths kept from init, because ``skip`` matched them (a new
        head) or, with ``strict=False``, because the file lacks them.
      unused: arrays in the file that no variable took: by their name in the
        file when the key map does not know them, else by the variable path they
        map to (a skipped head from the file shows as ``params/head/kernel``).
    """

    loaded: tuple[str, ...]
    kept: tuple[str, ...]
    unused: tuple[str, ...]

    def __str__(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} arrays, kept {len(self.kept)} from init, "
            f"{len(self.unused)} unused in the file"
        ]
        lines += [f"  kept from init: {p}" for p in self.kept]
        lines += [f"  unused in file: {k}" for k in self.unused]
        return "\n".join(lines)


def _compile(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise WeightsError(f"invalid skip regex {p!r}: {e}") from None
    return out


def _skipped(path: str, patterns: Sequence[re.Pattern[str]]) -> bool:
    # A pattern may name the path with or without its collection:
    # "head/.*" skips params/head/... and batch_stats/head/...
    bare = path.split("/", 1)[1]
    return any(p.fullmatch(bare) or p.fullmatch(path) for p in patterns)


def keymap(arch: str) -> keymaps.KeyMap:
    """The key map of ``arch``; a WeightsError lists the known ones."""
    try:
        return keymaps.get(arch)
    except ValueError as e:
        raise WeightsError(f"{e} (init.arch, or --arch of jft convert)") from None


def infer_arch(flat: Mapping[str, np.ndarray]) -> str:
    """The registered key map that takes the most arrays of ``flat``.

    Raises:
      WeightsError: no key map takes any of them.
    """
    best, best_n = None, 0
    for arch in keymaps.names():
        try:
            mapped, _ = keymaps.get(arch)(flat)
        except Exception:  # a key map written for another layout may choke: skip it
            continue
        if len(mapped) > best_n:
            best, best_n = arch, len(mapped)
    if best is None:
        sample = ", ".join(list(flat)[:3])
        raise WeightsError(
            f"no key map recognizes these weights (e.g. {sample}); known archs: "
            f"{', '.join(keymaps.names())}"
        )
    return best


def check_layout(flat: Mapping[str, Any], arch: str, source: str | None = None) -> None:
    """Refuses a source-framework ``arch`` for arrays already named by jft paths.

    Another key map could take such names for its own (a Keras map reads
    ``params/backbone/fc7/kernel`` as a layer and picks the wrong one as the
    head), so jft-named files are read with ``arch="jft"`` only.
    """
    if arch != "jft" and flat and all(str(k).startswith(_JFT_COLLECTIONS) for k in flat):
        raise WeightsError(
            f"{source or 'the weights'}: the arrays are named by jft paths "
            f"({next(iter(flat))}), so arch={arch!r} does not apply; use arch='jft' "
            "(--arch jft, init.arch='jft') or leave it empty"
        )


_JFT_COLLECTIONS = ("params/", "batch_stats/")


def _finite(value: Any) -> bool:
    if not jnp.issubdtype(np.asarray(value).dtype, jnp.inexact):
        return True
    return bool(np.isfinite(np.asarray(value)).all())


def check_finite(
    mapped: Mapping[str, Any], flat: Mapping[str, np.ndarray], source: str | None = None
) -> None:
    """Raises a WeightsError naming the first array of ``mapped`` that holds NaN or Inf.

    Args:
      mapped: jft variable path -> array (what would be loaded).
      flat: the arrays by their names in the file, to name the culprit there too.
      source: the file or folder, for the message.
    """
    bad = next((p for p, v in mapped.items() if not _finite(v)), None)
    if bad is None:
        return
    value = np.asarray(mapped[bad])
    count = int(np.size(value) - np.isfinite(value).sum())
    in_file = [k for k, v in flat.items() if not _finite(v)]
    named = f"tensor {in_file[0]!r} ({bad})" if in_file else f"tensor {bad}"
    more = f", and {len(in_file) - 1} more tensors" if len(in_file) > 1 else ""
    raise WeightsError(
        f"{source or 'the weights'}: {named} holds {count} non-finite values (NaN/Inf){more}; "
        "the file is damaged: get a good copy, or list the layer in init.skip to keep its init"
    )


def restore(
    variables: Mapping[str, Any],
    flat: Mapping[str, np.ndarray],
    arch: str,
    skip: Sequence[str] = (),
    strict: bool = True,
    *,
    source: str | None = None,
    materialize: bool = True,
) -> tuple[dict[str, Any], RestoreReport]:
    """Returns ``variables`` filled from ``flat``, and a report.

    Args:
      variables: the model's initial variables (``{"params": ..., "batch_stats": ...}``).
      flat: source name -> array, as :func:`jft.weights.read` returns.
      arch: the key map to use (``"resnet"``, ``"vgg"``, ``"bert"``, ``"vit"``...).
      skip: regexes over variable paths that are deliberately new (a head): they
        keep their init values even when the file has them, whatever the shapes.
      strict: when True, a variable missing from the file is an error; when
        False it keeps its init value and is listed in ``report.kept``.
      source: the file the arrays came from, named in error messages.
      materialize: when False, loaded leaves stay the key map's arrays (views of a
        memory-mapped file, in the file's dtype) and are not checked finite: the
        caller places and checks them shard by shard (:func:`jft.weights.sharding.place`).

    Returns:
      ``(variables, report)``: new variables, same tree and dtypes as the input.

    Raises:
      WeightsError: one line naming every shape mismatch (path and both shapes)
        and, with ``strict``, every missing variable; or naming an array that
        would be loaded and holds NaN or Inf. (:func:`jft.weights.read` returns
        such arrays as they are, so that ``jft inspect`` can show the file;
        restoring is where they are refused.)
    """
    patterns = _compile(skip)
    check_layout(flat, arch, source)
    mapped, unused = keymap(arch)(flat)
    target = traverse_util.flatten_dict(unfreeze(dict(variables)), sep="/")

    if not any(k in mapped for k in target):
        sample = ", ".join(list(flat)[:3])
        raise WeightsError(
            f"no variable of the model was found in the file with arch={arch!r} "
            f"(the file has {len(flat)} arrays, e.g. {sample}); is arch right for this file?"
        )

    out: dict[str, Any] = {}
    loaded, kept, missing, mismatched = [], [], [], []
    for path, init in target.items():
        if _skipped(path, patterns):
            out[path] = init
            kept.append(path)
            continue
        if path not in mapped:
            missing.append(path)
            out[path] = init
            continue
        value = mapped[path]
        if tuple(value.shape) != tuple(init.shape):
            mismatched.append(f"{path}: file {tuple(value.shape)} vs model {tuple(init.shape)}")
            out[path] = init
            continue
        out[path] = jnp.asarray(value, dtype=init.dtype) if materialize else value
        loaded.append(path)

    unused = list(unused) + [k for k in mapped if k not in target or _skipped(k, patterns)]
    problems = []
    if mismatched:
        problems.append(
            "shape mismatch (add a skip regex if the layer is new): " + "; ".join(mismatched)
        )
    if missing and strict:
        problem = f"{len(missing)} variables missing from the file: " + ", ".join(missing)
        if all(m.split("/", 1)[-1].startswith("head/") for m in missing):
            problem += '; a new classification head? pass skip=["head/.*"] to keep it from init'
        problems.append(problem)
    if problems:
        raise WeightsError(" | ".join(problems))
    if materialize:
        check_finite({p: mapped[p] for p in loaded}, flat, source)
    kept += missing
    report = RestoreReport(tuple(loaded), tuple(kept), tuple(sorted(unused)))
    return traverse_util.unflatten_dict(out, sep="/"), report
