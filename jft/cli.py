"""The ``jft`` command: ``jft train | eval | convert | inspect``.

Thin by design: it parses flags and calls the library. ``jft train`` loads a
recipe with ml_collections' ``config_flags`` (so ``--config.optimizer.lr=0.01``
works) and calls :func:`jft.train.train_and_evaluate`. A user mistake (an unknown
config key, a wrong type, a missing file, an unknown data set) prints one line
and exits with status 2; it never prints a traceback.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence

DEFAULT_RECIPE = "digits_transfer"


def _configs_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[1] / "configs"


def _recipe_path(spec: str) -> tuple[str, str, str]:
    """``configs/x.py:arg`` or a recipe name ``x[:arg]`` -> (path, arg, recipe name)."""
    path, sep, arg = spec.partition(":")
    if not os.path.exists(path) and not path.endswith(".py"):
        candidate = _configs_dir() / f"{path}.py"
        if candidate.exists():
            path = str(candidate)
    if not os.path.isfile(path):
        known = sorted(p.stem for p in _configs_dir().glob("*.py") if not p.stem.startswith("_"))
        raise UserError(f"config file not found: {spec!r} (recipes: {', '.join(known)})")
    return path, arg if sep else "", pathlib.Path(path).stem


class UserError(Exception):
    """A mistake on the command line; printed as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from absl import flags

    from jft import data, partition, train, weights

    return (
        UserError,
        flags.Error,
        train.ConfigError,
        train.CheckpointError,
        train.NonFiniteError,
        data.DataError,
        weights.WeightsError,
        partition.PartitionError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        PermissionError,
    )


def _load_config(spec: str, overrides: Sequence[str]):
    """The recipe at ``spec`` with ``--config.key=value`` overrides applied (config_flags)."""
    from absl import flags
    from ml_collections import config_flags

    path, arg, name = _recipe_path(spec)
    argv = ["jft", f"--config={path}:{arg}" if arg else f"--config={path}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, sys_argv=argv)
    for item in overrides:
        if not item.startswith("--config."):
            raise UserError(
                f"unknown flag {item.split('=')[0]!r} (overrides are --config.KEY=VALUE)"
            )
    try:
        fv(argv)
        config = fv.config
    except (AttributeError, KeyError) as e:
        key = str(e).strip("'\"")
        raise UserError(f"unknown config key {key!r} in {' '.join(overrides)}") from None
    except flags.Error as e:
        raise UserError(str(e).splitlines()[0]) from None
    return config, name


def _train(args: argparse.Namespace) -> int:
    from jft import train

    config, name = _load_config(args.config, args.overrides)
    workdir = args.workdir or os.path.join("runs", name)
    result = train.train_and_evaluate(config, workdir)
    if isinstance(result, dict) and "preempted" in result:
        return 0
    return 0


def _eval(args: argparse.Namespace) -> int:
    import numpy as np

    from jft import train
    from jft.train.logging import format_table

    out = train.evaluate(args.workdir, step=args.step)
    rows = [[k, v] for k, v in out.items() if np.ndim(v) == 0]
    print(format_table(rows, ["metric", "value"]))
    if "confusion_matrix" in out:
        print("confusion matrix (rows: true class, columns: predicted):")
        print(np.asarray(out["confusion_matrix"]))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from jft import weights

    report = weights.convert(
        args.src, args.dst, arch=args.arch or None, model=args.model or None, skip=args.skip
    )
    print(f"wrote {args.dst}: {str(report).splitlines()[0]}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import re

    from jft import weights
    from jft.train import checkpoint
    from jft.train.logging import format_table

    path = args.path
    if not os.path.exists(path):
        raise UserError(f"no such file or folder: {path}")
    if checkpoint.is_checkpoint_dir(path):
        entries = checkpoint.read_metadata(path)  # path -> (shape, dtype)
    else:
        entries = {k: (tuple(v.shape), str(v.dtype)) for k, v in weights.read(path).items()}
    status = {}
    if args.config:
        from jft import partition
        from jft.train import config as config_lib

        config, _ = _load_config(args.config, args.overrides)
        config = config_lib.resolve(config)
        frozen = [re.compile(r) for r in config.frozen]
        for k in entries:
            bare = k.removeprefix("params/").removeprefix("state/params/")
            if not k.startswith(("params/", "state/trainable/", "state/frozen/")) and "/" in k:
                if k.startswith(("batch_stats/", "opt_state/", "state/")):
                    continue
            status[k] = "frozen" if any(p.fullmatch(bare) for p in frozen) else "trainable"
        del partition
    rows, total = [], 0
    for k, (shape, dtype) in entries.items():
        size = 1
        for d in shape:
            size *= int(d)
        total += size
        row = [k, "x".join(map(str, shape)) or "scalar", dtype]
        if args.config:
            row.append(status.get(k, "-"))
        rows.append(row)
    header = ["path", "shape", "dtype"] + (["status"] if args.config else [])
    print(format_table(rows, header))
    print(f"{len(rows)} arrays, {total:,} values")
    if args.config:
        n_frozen = sum(1 for s in status.values() if s == "frozen")
        print(f"{n_frozen} frozen, {len(status) - n_frozen} trainable")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jft", description="Fine-tune pretrained models in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "train",
        help="train and evaluate a recipe (default: the offline digits_transfer)",
        description="Train and evaluate a recipe; --config.KEY=VALUE overrides any config key.",
    )
    p.add_argument("--config", default=DEFAULT_RECIPE, help="configs/X.py[:arg] or a recipe name")
    p.add_argument("--workdir", default=None, help="run folder (default ./runs/<recipe>)")
    p = sub.add_parser("eval", help="evaluate a run's latest checkpoint on its eval split")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None)
    p = sub.add_parser("convert", help="convert a weights file to a Flax (orbax) checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--arch", default="", help="key map (resnet, vgg, bert, vit, jft); inferred")
    p.add_argument("--model", default="", help="fill this jft model (checks shapes)")
    p.add_argument("--skip", action="append", default=[], help="regex of variables to keep new")
    p = sub.add_parser(
        "inspect", help="parameter paths, shapes and dtypes of a weights file or checkpoint"
    )
    p.add_argument("path")
    p.add_argument("--config", default=None, help="say which parameters this recipe freezes")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jft`` console script."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.overrides = rest
    if rest and args.command not in ("train", "inspect"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    commands = {"train": _train, "eval": _eval, "convert": _convert, "inspect": _inspect}
    try:
        errors = _user_errors()
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("jft: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, errors):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"jft {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
