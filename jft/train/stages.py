"""A staged config: named sub-configs run in order, each into its own workdir.

``config.stages`` names the sub-configs; each runs as :func:`jft.train.loop.train`
into ``workdir/<stage>``, and a stage may start from an earlier one's final
checkpoint with ``init.path = "stage:<name>"``. The default recipe pretrains,
fine-tunes a frozen trunk, unfreezes it, and trains a from-scratch baseline; the
results are printed side by side and plotted.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from jft.train import config as config_lib
from jft.train import distributed, loop
from jft.train.lock import WorkdirLock
from jft.train.logging import format_table, write_stage_plots

__all__ = ["run_stages"]


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def run_stages(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs each stage of a validated staged config into ``workdir/<stage>``; results by stage.

    Stops after a stage that SIGTERM preempted (its result holds ``"preempted"``).
    """
    workdir = os.path.abspath(workdir)
    # The first stage's distributed settings start JAX's runtime, as its run would.
    distributed.initialize(config.get(config.stages[0]) or config)
    with WorkdirLock(workdir, jax.process_index()):
        return _run_stages_locked(config, workdir)


def _run_stages_locked(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    results = {}
    for name in config.stages:
        if name not in config:
            raise config_lib.ConfigError(
                f"config.stages names '{name}', but config.{name} is missing"
            )
        sub = ml_collections.ConfigDict(config[name].to_dict())
        init = sub.get("init", {}).get("path", "")
        if init.startswith("stage:"):
            ref = init.removeprefix("stage:")
            if ref not in results:
                raise config_lib.ConfigError(
                    f"config.{name}.init.path names stage '{ref}', which does not run before it"
                )
            sub.init.path = os.path.join(workdir, ref)
        _log(f"\n== stage {name}: {sub.get('description', '')}")
        results[name] = loop.train(config_lib.resolve(sub), os.path.join(workdir, name))
        if "preempted" in results[name]:
            return results
    rows = []
    for name, r in results.items():
        rows.append(
            [
                name,
                config[name].get("description", ""),
                r.get("step", 0),
                r.get("eval/accuracy", float("nan")),
                r.get("eval/loss", float("nan")),
            ]
        )
    table = format_table(rows, ["stage", "what", "steps", "eval accuracy", "eval loss"])
    if jax.process_index() == 0:
        print("\n" + table, flush=True)
        write_stage_plots(workdir, list(results))
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(
                {
                    k: {m: v for m, v in r.items() if isinstance(v, float | int | str)}
                    for k, r in results.items()
                },
                f,
                indent=1,
            )
    return results
