"""The ``jft`` command: ``jft train | eval | convert | export | inspect | config | recipes``.

Thin by design: it parses flags and calls the library. ``jft train`` runs a
recipe's ``get_config()``, applies ``--config.KEY=VALUE`` overrides with
ml_collections' ``config_flags`` and calls :func:`jft.train.train_and_evaluate`.

A user-facing failure (any :class:`jft.errors.JftError`: an unknown config key, a
broken recipe, a wrong shape; or an ``OSError``: a missing or unwritable file) is
printed as one line, the last one, with exit status 2 and no traceback unless
``--debug`` or ``JFT_DEBUG=1`` asks for it. Any other exception is a bug in jft
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import ast
import gc
import importlib.machinery
import importlib.util
import os
import pathlib
import sys
import traceback
from collections.abc import Sequence

from jft.errors import JftError

DEFAULT_RECIPE = "digits_transfer"


class UserError(JftError):
    """A mistake on the command line; printed as one line."""


def _recipes_dir() -> pathlib.Path:
    """The shipped recipes: the top-level ``configs/``, installed as the package ``jft.configs``."""
    spec = importlib.util.find_spec("jft.configs")
    if spec is not None and spec.submodule_search_locations:
        return pathlib.Path(next(iter(spec.submodule_search_locations)))
    # A source checkout put on sys.path without being installed.
    return pathlib.Path(__file__).resolve().parents[1] / "configs"


def recipes() -> dict[str, pathlib.Path]:
    """The shipped recipes by name (``digits_mlp``), sorted."""
    found = sorted(_recipes_dir().glob("*.py"))
    return {p.stem: p for p in found if not p.stem.startswith("_")}


def _summary(path: pathlib.Path) -> str:
    """The first line of a recipe's docstring, read without running the recipe."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_bytes(), filename=str(path)))
    except (SyntaxError, ValueError):
        return "(does not parse)"
    lines = (doc or "").strip().splitlines()
    return lines[0] if lines else ""


def _recipe_path(spec: str) -> tuple[str, str, str]:
    """``configs/x.py:arg`` or a recipe name ``x[:arg]`` -> (path, arg, recipe name)."""
    path, sep, arg = spec.partition(":")
    if not os.path.exists(path) and not path.endswith(".py"):
        shipped = recipes()
        if path in shipped:
            path = str(shipped[path])
    if not os.path.isfile(path):
        raise UserError(
            f"config file not found: {spec!r} (recipes: {', '.join(recipes())}; "
            "or pass a path, --config path/to/recipe.py)"
        )
    return path, arg if sep else "", pathlib.Path(path).stem


def _load_recipe(path: str, arg: str):
    """The ``get_config(arg)`` of the recipe file at ``path``; a broken recipe is a UserError."""
    import ml_collections

    name = f"jft_recipe_{pathlib.Path(path).stem}"
    loader = importlib.machinery.SourceFileLoader(name, path)  # any file name, not only *.py
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        loader.exec_module(module)
    except JftError:
        raise
    except SyntaxError as e:
        where = path if e.filename in (None, path) else e.filename
        raise UserError(f"recipe {where}, line {e.lineno}: {e.msg} (fix the syntax)") from e
    except Exception as e:
        raise UserError(
            f"recipe {path} failed to load: {type(e).__name__}: {e} (--debug shows where)"
        ) from e
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise UserError(
            f"recipe {path} has no get_config(); define get_config(arg=None) returning "
            "an ml_collections.ConfigDict"
        )
    try:
        config = get_config(arg) if arg else get_config()
    except JftError:
        raise
    except Exception as e:
        raise UserError(
            f"recipe {path}: get_config() raised {type(e).__name__}: {e} (--debug shows where)"
        ) from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(
            f"recipe {path}: get_config() returned a {type(config).__name__}, "
            "not an ml_collections.ConfigDict"
        )
    return config


def _check_key(config, key: str) -> None:
    """An override's key must exist: name it and list the keys of its group if not."""
    import ml_collections

    node, group = config, []
    for part in key.split("."):
        if "[" in part or not isinstance(node, ml_collections.ConfigDict):
            return  # an index or a value that is not a group: config_flags checks the rest
        if part not in node:
            if group and group[-1] == "optimizer" and part in _optimizer_keys():
                return  # any rule's argument; the trainer checks it against the chosen rule
            where = f"{'.'.join(group)} has" if group else "the config has"
            raise UserError(f"unknown config key {key!r}; {where}: {', '.join(node.keys())}")
        node = node[part]
        group.append(part)


def _optimizer_keys() -> frozenset[str]:
    from jft.train import config as config_lib

    return config_lib.optimizer_keys()


def _override(config, overrides: Sequence[str]):
    """``config`` with the ``--config.KEY=VALUE`` overrides applied by config_flags."""
    from absl import flags
    from ml_collections import config_flags

    for item in overrides:
        if not item.startswith("--config."):
            raise UserError(
                f"unknown flag {item.split('=')[0]!r} (overrides are --config.KEY=VALUE)"
            )
        _check_key(config, item.removeprefix("--config.").split("=")[0])
    argv = ["jft", *overrides]
    fv = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict(
            "config",
            config,
            flag_values=fv,
            sys_argv=argv,
            lock_config=False,
            accept_new_attributes=True,  # only optimizer arguments get past _check_key
        )
        fv(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, flags.Error):  # absl's message names the flag already
            msg = f"bad override in {' '.join(overrides)}: {msg}"
        raise UserError(msg) from e
    return fv.config


def _load_config(spec: str, overrides: Sequence[str]):
    """The recipe ``spec`` (a name or a file, ``[:arg]``) with its overrides, and its name."""
    path, arg, name = _recipe_path(spec)
    return _override(_load_recipe(path, arg), overrides), name


def _train(args: argparse.Namespace) -> int:
    if args.list:
        return _recipes(args)
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
    from jft import models, weights

    # Checked here, before the file is read: the library's own check is a ValueError.
    if args.arch and args.arch not in weights.keymaps.names():
        known = ", ".join(weights.keymaps.names())
        raise UserError(f"unknown --arch {args.arch!r}; known archs: {known}")
    if args.model and args.model not in models.names():
        raise UserError(
            f"unknown --model {args.model!r}; known models: {', '.join(models.names())}"
        )
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
    )
    print(f"wrote {dst} ({args.format})")
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


def _config(args: argparse.Namespace) -> int:
    """Prints every key of the recipe's run config, defaults included, as ``key = value``."""
    import ml_collections

    config, _ = _load_config(args.recipe, args.overrides)
    if config.get("program"):  # a study with its own keys (quadratic): nothing to lay over
        resolved = config
    elif config.get("stages"):
        resolved = ml_collections.ConfigDict({"stages": tuple(config.stages)})
        for stage in config.stages:
            if stage not in config:
                raise UserError(f"config.stages names {stage!r}, but config.{stage} is missing")
            resolved[stage] = _resolve_to_show(config[stage])
    else:
        resolved = _resolve_to_show(config)
    for key, value in _flatten(resolved):
        print(f"{key} = {value!r}")
    return 0


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
        print(f"{name:<{width}}  {_summary(path)}")
    print(f"run one: jft train --config NAME (files in {_recipes_dir()})")
    return 0


def _quiet() -> None:
    # Library chatter (tfds' "OpenCV is not installed", orbax's notices, TF's C++ logs)
    # buries the lines a user needs: keep errors only.
    import logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("absl").setLevel(logging.ERROR)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    # A failed asynchronous save (a full disk) is reported as one line by the
    # checkpoint code; asyncio would also log each of orbax's unretrieved futures,
    # from a garbage-collector pass at a moment nobody controls.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # preparing the digits takes a second: no bars for that


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
        description="Export a run (its latest checkpoint, or --step N), a checkpoint folder, "
        "a weights file or a Hugging Face folder in the format its framework loads.",
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
    p = sub.add_parser(
        "inspect", help="parameter paths, shapes and dtypes of a weights file or checkpoint"
    )
    p.add_argument("path")
    p.add_argument("--config", default=None, help="say which parameters this recipe freezes")
    return parser


def _user_message(error: BaseException) -> str | None:
    """The one line printed for a user-facing error; None for a bug (keeps its traceback)."""
    if isinstance(error, JftError):
        return " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None:
        paths = " -> ".join(repr(os.fsdecode(f)) for f in (error.filename, error.filename2) if f)
        return f"{paths}: {error.strerror or error}"
    if isinstance(error, OSError):
        return " ".join(str(error).split()) or type(error).__name__
    return None


def _finish_output(error: BaseException) -> None:
    """Lets whatever the failed command left open (a progress bar) print before the error.

    An open tqdm bar lives in a frame of the traceback and prints its last state when
    it is freed, which would come after the error line: free those frames now.
    """
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()


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
            _quiet()
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("jft: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (jft recipes | head): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        message = _user_message(e)
        if message is None or debug:
            raise
        _finish_output(e)
        print(f"jft {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
