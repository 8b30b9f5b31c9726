"""The ``jft`` command: ``jft train | eval | convert | export | inspect | config | recipes``.

Thin by design: it parses flags and calls the library. ``jft train`` runs a
recipe's ``get_config()``, applies ``--config.KEY=VALUE`` overrides with
ml_collections' ``config_flags`` and calls :func:`jft.train.train_and_evaluate`.

A user-facing failure (any :class:`jft.errors.JftError`: an unknown config key, a
broken recipe, a wrong shape; or an ``OSError``: a missing or unwritable file) is
printed as one line, the last one, with exit status 2 and no traceback unless
``--debug`` or ``JFT_DEBUG=1`` asks for it. Any other exception is a bug in jft
and keeps its traceback.

This module holds the commands and their flags; finding, loading and overriding
a recipe is :mod:`jft._recipes`, and the error mapping is :mod:`jft._cli_errors`.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

from jft._cli_errors import UserError, finish_output, quiet, user_message
from jft._recipes import DEFAULT_RECIPE, load_config, recipes, recipes_dir, summary

__all__ = ["DEFAULT_RECIPE", "UserError", "main", "recipes"]


def _train(args: argparse.Namespace) -> int:
    if args.list:
        return _recipes(args)
    from jft import train

    config, name = load_config(args.config, args.overrides)
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
    from jft import models, weights

    # Checked here, before the file is read, naming the flag.
    if args.arch:
        weights.keymaps.KEYMAPS.get(args.arch, key="--arch", error=UserError)
    if args.model:
        models.MODELS.get(args.model, key="--model", error=UserError)
    report = weights.convert(
        args.src, args.dst, arch=args.arch or None, model=args.model or None, skip=args.skip
    )
    print(f"wrote {args.dst}: {str(report).splitlines()[0]}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from jft import train

    labels = [x for x in args.labels.split(",") if x] if args.labels else None
    dst = train.export(
        args.src,
        args.dest,
        format=args.format,
        step=args.step,
        dtype=args.dtype,
        labels=labels,
        like=args.like,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        merge=args.merge,
        best=args.best,
    )
    print(f"wrote {dst} ({args.format})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from jft import partition, weights
    from jft.peft import summarize_arrays
    from jft.train import checkpoint
    from jft.train.logging import format_table

    path = args.path
    if not os.path.exists(path):
        raise UserError(f"no such file or folder: {path}")
    if checkpoint.is_checkpoint_dir(path):
        meta = checkpoint.read_metadata(path)
        entries, base = meta.arrays, getattr(meta, "base", None)
        if meta.step is not None:
            print(f"{meta.directory}: step {meta.step} (saved steps: {list(meta.steps)})")
    else:
        entries = {k: (tuple(v.shape), str(v.dtype)) for k, v in weights.read(path).items()}
        base = None
    frozen = None
    if args.config:
        from jft.train import config as config_lib

        config, _ = load_config(args.config, args.overrides)
        frozen = partition.is_frozen(config_lib.build_rules(config_lib.resolve(config)))

    def status(name: str) -> str:
        for prefix in ("params/", "trainable/", "frozen/"):
            if name.startswith(prefix):
                bare = name.removeprefix(prefix)
                return "frozen" if frozen(bare) else "trainable"
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
    adapters = summarize_arrays(entries, base=(base or {}).get("arrays"), is_frozen=frozen)
    for line in adapters.lines():  # which modules carry adapters; the trainable fraction
        print(line)
    return 0


def _config(args: argparse.Namespace) -> int:
    """Prints every key of the recipe's run config as ``key = value``, defaults included.

    A value that differs from its default says so (``# default: ...``); the chosen
    optimizer's arguments are all shown, with the rule's own defaults.
    """
    import ml_collections

    config, _ = load_config(args.recipe, args.overrides)
    if config.get("program"):  # a study with its own keys (quadratic): nothing to lay over
        for key, value in _flatten(config):
            print(f"{key} = {value!r}")
        return 0
    if config.get("stages"):
        runs = []
        for stage in config.stages:
            if stage not in config:
                raise UserError(f"config.stages names {stage!r}, but config.{stage} is missing")
            runs.append((f"{stage}.", _resolve_to_show(config[stage])))
        print(f"stages = {tuple(config.stages)!r}")
    else:
        runs = [("", _resolve_to_show(config))]
    from jft.train import config as config_lib

    defaults = dict(_flatten(config_lib.default_config()))
    for prefix, run in runs:
        own = config_lib.optimizer_arguments(run.optimizer.name)
        with run.unlocked():
            for arg, default in own.items():
                if arg not in run.optimizer and default is not inspect.Parameter.empty:
                    run.optimizer[arg] = default
        for key, value in _flatten(run):
            default = defaults.get(key, own.get(key.removeprefix("optimizer."), _NONE))
            if isinstance(value, ml_collections.ConfigDict):
                value = value.to_dict()
            note = "" if default is _NONE or default == value else f"  # default: {default!r}"
            print(f"{prefix}{key} = {value!r}{note}")
    return 0


_NONE = object()


def _resolve_to_show(run):
    """One run's config over the defaults, as the trainer resolves it.

    A recipe that needs pretrained weights (``init.required``) is shown without
    them: that check belongs to running it, whose error says what to set.
    """
    from jft.train import config as config_lib

    run = run.copy_and_resolve_references()
    required = bool(run.get("init", {}).get("required", False))
    if required:
        with run.unlocked():
            run.init.required = False
    out = config_lib.resolve(run)
    out.init.required = required
    return out


def _flatten(config, prefix: str = ""):
    for key, value in config.items():
        if hasattr(value, "items") and len(value):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value.to_dict() if hasattr(value, "to_dict") else value


def _recipes(args: argparse.Namespace) -> int:
    """Lists the shipped recipes with the first line of each docstring."""
    del args
    shipped = recipes()
    width = max(map(len, shipped), default=0)
    for name, path in shipped.items():
        print(f"{name:<{width}}  {summary(path)}")
    print(f"run one: jft train --config NAME (files in {recipes_dir()})")
    return 0


_DEBUG_HELP = "on an error, show its traceback (also JFT_DEBUG=1)"


class _SubParser(argparse.ArgumentParser):
    """A command's parser; it also takes the global flags (``--debug``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help=_DEBUG_HELP,
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jft", description="Fine-tune pretrained models in JAX.")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    # --debug is global, and also accepted after the command (``jft train --debug``).
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_SubParser)
    p = sub.add_parser(
        "train",
        help="train and evaluate a recipe (default: the offline digits_transfer)",
        description="Train and evaluate a recipe; --config.KEY=VALUE overrides any config key.",
    )
    p.add_argument("--config", default=DEFAULT_RECIPE, help="a recipe name or path/to/X.py[:arg]")
    p.add_argument("--workdir", default=None, help="run folder (default ./runs/<recipe>)")
    p.add_argument("--list", action="store_true", help="list the recipes (as jft recipes)")
    p = sub.add_parser(
        "config",
        help="print every key of a recipe's config with its value (defaults included)",
        description="Print a recipe's resolved config as key = value; --config.KEY=VALUE applies.",
    )
    p.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help="a recipe name or a file")
    sub.add_parser("recipes", help="list the shipped recipes with their one-line descriptions")
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
        "export",
        help="write a run, checkpoint or weights back to hf, timm, torchvision, keras...",
        description="Export a run (its latest checkpoint, --step N, or --best), a checkpoint "
        "folder, a weights file or a Hugging Face folder in the format its framework loads.",
    )
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument(
        "--format",
        required=True,
        choices=("hf", "timm", "torchvision", "keras", "safetensors", "npz", "orbax", "peft"),
    )
    p.add_argument("--step", type=int, default=None, help="a run's step (default: latest)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    p.add_argument("--labels", default="", help="class names of the head, comma-separated")
    p.add_argument("--like", default=None, help="HF folder for config.json and tokenizer")
    p.add_argument("--max-shard-size", default="5GB", help="hf shard size (5GB, 200MB...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    p.add_argument("--merge", action="store_true", help="a LoRA run's adapters merged in")
    p.add_argument("--best", action="store_true", help="the run's step with the best eval metric")
    p = sub.add_parser(
        "inspect",
        help="parameter paths, shapes and dtypes of a weights file or checkpoint, its "
        "adapters and trainable fraction",
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
    if rest and args.command not in ("train", "inspect", "config"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    debug = args.debug or os.environ.get("JFT_DEBUG", "") not in ("", "0")
    commands = {
        "train": _train,
        "config": _config,
        "recipes": _recipes,
        "eval": _eval,
        "convert": _convert,
        "export": _export,
        "inspect": _inspect,
    }
    try:
        if args.command != "recipes":
            quiet()
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("jft: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (jft recipes | head): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        message = user_message(e)
        if message is None or debug:
            raise
        finish_output(e)
        print(f"jft {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
