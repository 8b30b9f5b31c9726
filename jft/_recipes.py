"""The recipes of the ``jft`` command: the shipped ones, loading one, applying its overrides.

A recipe is a name of ``configs/`` (installed as ``jft.configs``) or a path,
``[:arg]`` passed to its ``get_config(arg)``. Overrides go through
ml_collections' ``config_flags``; an unknown key is refused first, naming the
keys of its group.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import os
import pathlib
import re
import sys
from collections.abc import Sequence

from jft._cli_errors import UserError
from jft.errors import JftError

__all__ = ["DEFAULT_RECIPE", "check_key", "load_config", "load_recipe", "recipes", "summary"]

DEFAULT_RECIPE = "digits_transfer"


def recipes_dir() -> pathlib.Path:
    """The shipped recipes: the top-level ``configs/``, installed as the package ``jft.configs``."""
    spec = importlib.util.find_spec("jft.configs")
    if spec is not None and spec.submodule_search_locations:
        return pathlib.Path(next(iter(spec.submodule_search_locations)))
    # A source checkout put on sys.path without being installed.
    return pathlib.Path(__file__).resolve().parents[1] / "configs"


def recipes() -> dict[str, pathlib.Path]:
    """The shipped recipes by name (``digits_mlp``), sorted."""
    found = sorted(recipes_dir().glob("*.py"))
    return {p.stem: p for p in found if not p.stem.startswith("_")}


def summary(path: pathlib.Path) -> str:
    """The first line of a recipe's docstring, read without running the recipe."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_bytes(), filename=str(path)))
    except (SyntaxError, ValueError):
        return "(does not parse)"
    lines = (doc or "").strip().splitlines()
    return lines[0] if lines else ""


def recipe_path(spec: str) -> tuple[str, str, str]:
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


def load_recipe(path: str, arg: str):
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


def check_key(config, key: str) -> None:
    """An override's key must exist: name it and list the keys of its group if not."""
    import ml_collections

    node, group = config, []
    for part in key.split("."):
        if "[" in part or not isinstance(node, ml_collections.ConfigDict):
            return  # an index or a value that is not a group: config_flags checks the rest
        if part not in node:
            if group and group[-1] == "optimizer" and part in optimizer_keys():
                return  # any rule's argument; the trainer checks it against the chosen rule
            where = f"{'.'.join(group)} has" if group else "the config has"
            raise UserError(f"unknown config key {key!r}; {where}: {', '.join(node.keys())}")
        node = node[part]
        group.append(part)


def optimizer_keys() -> frozenset[str]:
    from jft.train import config as config_lib

    return config_lib.optimizer_keys()


_RULE_SETTING = re.compile(r"--config\.((?:\w+\.)*)rules\[(\d+)\]\[1\]\.(\w+)=(.*)", re.DOTALL)


def _set_rule_setting(config, match: re.Match[str]) -> None:
    """``--config.rules[i][1].ARG=VALUE``: one optimizer argument of partition rule ``i``.

    A rule's settings are a plain dict inside a tuple, where config_flags can change
    a key but not add one; any argument of an optimizer may be set here, and the
    trainer checks it against the rule's optimizer.
    """
    prefix, index, arg, text = match.groups()
    node = config
    for part in filter(None, prefix.split(".")):
        node = node[part] if part in node else None
        if node is None:
            raise UserError(f"unknown config key {prefix + 'rules'!r}")
    key = f"{prefix}rules[{index}][1].{arg}"
    rules = node.get("rules", ())
    if int(index) >= len(rules):
        raise UserError(f"config key {key!r}: config.{prefix}rules has {len(rules)} rules")
    settings = rules[int(index)][1]
    if settings is None:
        raise UserError(f"config key {key!r}: rule {index} freezes, so it has no optimizer")
    if arg not in settings and arg not in optimizer_keys():
        raise UserError(
            f"unknown config key {key!r}; rules[{index}][1] takes the keys of an optimizer: "
            f"{', '.join(sorted(optimizer_keys()))}"
        )
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word: a string, as config_flags reads it
    settings[arg] = value


def override(config, overrides: Sequence[str]):
    """``config`` with the ``--config.KEY=VALUE`` overrides applied by config_flags."""
    from absl import flags
    from ml_collections import config_flags

    rest, rule_settings = [], []
    for item in overrides:
        if not item.startswith("--config."):
            raise UserError(
                f"unknown flag {item.split('=')[0]!r} (overrides are --config.KEY=VALUE)"
            )
        match = _RULE_SETTING.fullmatch(item)
        if match:
            rule_settings.append(match)  # after the others, which may set config.rules
            continue
        check_key(config, item.removeprefix("--config.").split("=")[0])
        rest.append(item)
    overrides = rest
    argv = ["jft", *overrides]
    fv = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict(
            "config",
            config,
            flag_values=fv,
            sys_argv=argv,
            lock_config=False,
            accept_new_attributes=True,  # only optimizer arguments get past check_key
        )
        fv(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, flags.Error):  # absl's message names the flag already
            msg = f"bad override in {' '.join(overrides)}: {msg}"
        raise UserError(msg) from e
    for match in rule_settings:
        _set_rule_setting(fv.config, match)
    return fv.config


def load_config(spec: str, overrides: Sequence[str]):
    """The recipe ``spec`` (a name or a file, ``[:arg]``) with its overrides, and its name."""
    path, arg, name = recipe_path(spec)
    return override(load_recipe(path, arg), overrides), name
