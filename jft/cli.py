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
    from jft.train import checkpoint
    from jft.train.logging import format_table

    workdir = args.workdir
    stages = []
    if os.path.isdir(workdir) and not checkpoint.is_checkpoint_dir(workdir):
        # A staged run (digits_transfer): evaluate each stage's latest checkpoint.
        stages = sorted(
            d for d in os.listdir(workdir) if checkpoint.is_checkpoint_dir(os.path.join(workdir, d))
        )
    if stages:
        rows = []
        for stage in stages:
            out = train.evaluate(os.path.join(workdir, stage), step=args.step)
            rows.append([stage, out["step"], out.get("accuracy", float("nan")), out["loss"]])
        print(format_table(rows, ["stage", "step", "accuracy", "loss"]))
        return 0
    out = train.evaluate(workdir, step=args.step)
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
        meta = checkpoint.read_metadata(path)
        entries = meta.arrays
        if meta.step is not None:
            print(f"{meta.directory}: step {meta.step} (saved steps: {list(meta.steps)})")
    else:
        entries = {k: (tuple(v.shape), str(v.dtype)) for k, v in weights.read(path).items()}
    frozen = None
    if args.config:
        from jft.train import config as config_lib

        config, _ = _load_config(args.config, args.overrides)
        frozen = [re.compile(r) for r in config_lib.resolve(config).frozen]

    def status(name: str) -> str:
        for prefix in ("params/", "trainable/", "frozen/"):
            if name.startswith(prefix):
                bare = name.removeprefix(prefix)
                return "frozen" if any(p.fullmatch(bare) for p in frozen) else "trainable"
        return "-"

    rows, total, counts = [], 0, {"frozen": 0, "trainable": 0, "-": 0}
    for name, (shape, dtype) in entries.items():
        size = 1
        for d in shape:
            size *= int(d)
        total += size
        row = [name, "x".join(map(str, shape)) or "scalar", dtype]
        if frozen is not None:
            row.append(status(name))
            counts[row[-1]] += size
        rows.append(row)
    header = ["path", "shape", "dtype"] + (["status"] if frozen is not None else [])
    print(format_table(rows, header))
    print(f"{len(rows)} arrays, {total:,} values")
    if frozen is not None:
        print(f"parameters: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen")
    return 0


def _quiet() -> None:
    # Library chatter (tfds' "OpenCV is not installed", orbax's notices, TF's C++ logs)
    # buries the lines a user needs: keep errors only.
    import logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("absl").setLevel(logging.ERROR)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # preparing the digits takes a second: no bars for that


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
    _quiet()
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
