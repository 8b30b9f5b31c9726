"""The notebooks in colabs/ run headless on CPU, top to bottom, with a few steps.

Each notebook is executed with nbclient in a kernel of this very interpreter (a
kernelspec written into a temporary JUPYTER_PATH, so nothing has to be installed
as a Jupyter kernel), with 8 fake CPU devices (so the TPU notebook runs jit and
pmap over 8 devices), JFT_DATA_DIR at a temporary folder, and the cell tagged
``parameters`` replaced by a few steps and a temporary workdir. A cell that
raises fails the test (nbclient's CellExecutionError).
"""

from __future__ import annotations

import json
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
KERNEL = "jft-test-python3"
NUM_STEPS = 5


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec that runs this interpreter, found through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    data_dir = tmp_path_factory.mktemp("tfds")
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jft tests",
        "language": "python",
        "env": {
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
            "JAX_PLATFORMS": "cpu",
            "JFT_DATA_DIR": str(data_dir),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "MPLBACKEND": "agg",
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))
        mp.setenv("JFT_DATA_DIR", str(data_dir))
        yield root


def test_notebooks_are_found_and_clean():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "finetune_frozen", "tpu"}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: one cell must be tagged 'parameters'"
        assert "NUM_STEPS" in tagged[0].source
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{path.name}: outputs are not cleared"
                )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, kernel_env):
    del kernel_env
    nb = nbformat.read(path, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    workdir = tmp_path / "run"
    params.source = f"NUM_STEPS = {NUM_STEPS}\nWORKDIR = {str(workdir)!r}"
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    text = "\n".join(
        o.get("text", "") if o.get("output_type") == "stream" else ""
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "8 cpu device(s)" in text or "8 device(s)" in text, text[:2000]
    assert workdir.exists()
    if path.stem == "tpu":
        assert f"resumed at {NUM_STEPS}, now at {2 * NUM_STEPS}" in text
        assert (workdir / "pmap" / "checkpoints").exists()
        assert "|accuracy jit - pmap| = 0.0000" in text  # the same steps on CPU
    if path.stem == "finetune_frozen":
        assert "trunk unchanged, bit for bit: True" in text
