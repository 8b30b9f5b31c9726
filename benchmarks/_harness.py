"""What the train-step benchmarks share: timing one compiled step, and one subprocess per row.

A benchmark script runs itself as ``script --worker MODEL VARIANT`` for each row
(:func:`run_rows`), so each row's peak RSS is its own; the worker times its step
with :func:`time_step` and prints its row as one ``RESULT {json}`` line.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def timed_steps(step: Any, state: Any, batch: Any, steps: int) -> tuple[Any, Any, list[float]]:
    """Runs a compiled ``step`` ``steps`` times: the last state and metrics, and each time."""
    import jax

    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return state, metrics, times


def time_step(step: Any, state: Any, batch: Any, steps: int) -> tuple[Any, Any, dict[str, Any]]:
    """Compiles ``step`` for ``(state, batch)``, warms it up and times ``steps`` calls.

    Returns:
      ``(state, metrics, row)``: the last state and metrics, and the row's timing
      fields: the fastest step (the least disturbed by other processes), the median,
      the compile time, XLA's FLOPs of the compiled step and the peak RSS.
    """
    import jax

    t0 = time.perf_counter()
    step = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = step.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost  # a list in older JAX
    state, metrics = step(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    state, metrics, times = timed_steps(step, state, batch, steps)
    return (
        state,
        metrics,
        {
            "step_s": min(times),
            "median_step_s": statistics.median(times),
            "compile_s": compile_s,
            "flops": cost.get("flops", float("nan")),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        },
    )


def time_interleaved(steps: dict[str, tuple[Any, Any, Any]], rounds: int) -> dict[str, dict]:
    """Times compiled steps in turn, one call of each per round, in one process.

    ``steps`` maps a name to ``(compiled step, state, batch)``; the first entry is
    the reference. A slow spell of a shared or throttled machine slows every step
    of a round alike, so the per-round ratio to the reference is steadier than a
    ratio of two separately timed runs: each entry's ``ratio`` is the median of
    its per-round ratios, ``ratio_lo`` and ``ratio_hi`` their quartiles, and
    ``step_s`` its median step time.
    """
    import jax

    states = {name: state for name, (_, state, _) in steps.items()}
    for name, (step, _, batch) in steps.items():  # warm-up: each step runs once first
        states[name], metrics = step(states[name], batch)
        jax.block_until_ready(metrics)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (step, _, batch) in steps.items():
            t0 = time.perf_counter()
            states[name], metrics = step(states[name], batch)
            jax.block_until_ready((states[name], metrics))
            times[name].append(time.perf_counter() - t0)
    reference = times[next(iter(steps))]
    out = {}
    for name, ts in times.items():
        ratios = sorted(t / r for t, r in zip(ts, reference, strict=True))
        q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        out[name] = {"step_s": statistics.median(ts), "ratio": q2, "ratio_lo": q1, "ratio_hi": q3}
    return out


def worker_main(args: Any, worker: Callable[..., dict], steps: int) -> bool:
    """In a ``--worker MODEL VARIANT`` process: prints the row's ``RESULT`` line, returns True."""
    if not args.worker:
        return False
    print("RESULT " + json.dumps(worker(*args.worker, steps, args.quick)), flush=True)
    return True


def subprocess_env(*, force_cpu: bool) -> dict[str, str]:
    """The workers' environment: the checkout on ``PYTHONPATH``; the CPU (forced, or by default)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if force_cpu:
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env.setdefault("JAX_PLATFORMS", "cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def run_rows(
    script: str,
    models: Sequence[str],
    variants: Sequence[str],
    steps: int,
    quick: bool,
    env: dict[str, str],
) -> dict[tuple[str, str], dict]:
    """Runs ``script --worker MODEL VARIANT`` for every pair, each in its own subprocess.

    Prints one progress line per row to stderr; exits with the worker's output if
    one fails.
    """
    rows = {}
    for name in models:
        for variant in variants:
            cmd = [sys.executable, os.path.abspath(script), "--worker", name, variant]
            cmd += ["--steps", str(steps)] + (["--quick"] if quick else [])
            t0 = time.perf_counter()
            rows[(name, variant)] = r = run_result(cmd, env, f"{name} {variant}")
            print(
                f"  {name} {variant}: {r['step_s'] * 1e3:.0f} ms/step (median "
                f"{r['median_step_s'] * 1e3:.0f}), compile {r['compile_s']:.1f} s, "
                f"subprocess {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    return rows


def run_result(cmd: Sequence[str], env: dict[str, str], what: str) -> dict:
    """Runs a worker subprocess and returns its last ``RESULT {json}`` line; exits if it fails."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not result:
        sys.exit(f"{what} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(result[-1][len("RESULT ") :])


def mib(n: float) -> str:
    """``n`` bytes in MiB, for a table cell."""
    return f"{n / 2**20:,.1f} MiB"
