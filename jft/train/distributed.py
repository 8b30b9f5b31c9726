"""Many hosts with JAX's own multi-controller runtime: ``jax.distributed.initialize``.

Every process runs the same program; each sees all devices (``jax.devices()``)
and feeds its own slice of each global batch (``jft.data.get`` picks it from
``jax.process_index()``), and ``jax.jit`` over the global mesh does the
collectives. Nothing here is a communication layer of jft's own: it only
collects the arguments of ``jax.distributed.initialize``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

__all__ = ["initialize", "settings"]

_ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
    "local_device_ids": "JAX_LOCAL_DEVICE_IDS",
}


def _section(config: Any) -> Mapping[str, Any]:
    if config is None:
        return {}
    section = config.get("distributed") if hasattr(config, "get") else None
    if section is None:
        return {}
    if hasattr(section, "to_dict"):
        section = section.to_dict()
    return dict(section)


def settings(config: Any = None) -> dict[str, Any]:
    """The arguments :func:`initialize` would use: ``config.distributed.*``, else the environment.

    Keys: ``coordinator_address`` (``host:port`` of process 0's coordinator),
    ``num_processes``, ``process_id``, ``local_device_ids`` (from the config, or
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``,
    ``JAX_LOCAL_DEVICE_IDS`` as a comma-separated list), ``auto`` (let JAX detect
    a cluster: Cloud TPU pods, SLURM, Open MPI, Kubernetes; config or
    ``JAX_DISTRIBUTED_AUTO=1``) and ``cpu_collectives`` (default ``"gloo"``; the
    CPU backend needs it for collectives across processes).
    """
    section = _section(config)
    out: dict[str, Any] = {}
    for key, env in _ENV.items():
        value = section.get(key)
        if value is None and os.environ.get(env):
            value = os.environ[env]
        out[key] = value
    for key in ("num_processes", "process_id"):
        if out[key] is not None:
            out[key] = int(out[key])
    if isinstance(out["local_device_ids"], str):
        out["local_device_ids"] = [int(i) for i in out["local_device_ids"].split(",") if i]
    auto = section.get("auto")
    if auto is None:
        auto = os.environ.get("JAX_DISTRIBUTED_AUTO", "") not in ("", "0", "false", "False")
    out["auto"] = bool(auto)
    out["cpu_collectives"] = section.get("cpu_collectives") or "gloo"
    return out


def initialize(config: Any = None) -> bool:
    """Starts JAX's multi-controller runtime if the config or the environment asks for it.

    Call it first thing in every process, before any other JAX call (JAX's
    backends must not have started). ``config.distributed`` (an optional
    section of the training config) or the environment (see :func:`settings`)
    gives the coordinator address, the number of processes and this process's
    id; with ``auto`` JAX finds them in the cluster environment. With none of
    them, or with one process, it does nothing.

    Args:
      config: the training config (a ``ConfigDict`` or mapping), or None for
        the environment alone.

    Returns:
      Whether this process is now part of a multi-process run.

    Raises:
      ValueError: a coordinator address without a number of processes or a
        process id (or the reverse).
    """
    if jax.distributed.is_initialized():
        return True
    s = settings(config)
    if s["auto"]:
        jax.config.update("jax_cpu_collectives_implementation", s["cpu_collectives"])
        jax.distributed.initialize()
        return True
    required = ("coordinator_address", "num_processes", "process_id")
    missing = [k for k in required if s[k] is None]
    if len(missing) == len(required) or (
        s["num_processes"] == 1 and s["coordinator_address"] is None
    ):
        return False
    if missing:
        raise ValueError(
            f"distributed: {', '.join(missing)} missing; set config.distributed.* or "
            + ", ".join(_ENV[k] for k in missing)
        )
    if s["num_processes"] == 1:
        return False
    # Collectives across processes on CPU need an implementation; GPUs and TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", s["cpu_collectives"])
    jax.distributed.initialize(
        coordinator_address=s["coordinator_address"],
        num_processes=s["num_processes"],
        process_id=s["process_id"],
        local_device_ids=s["local_device_ids"],
    )
    return True
