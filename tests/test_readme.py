"""The README's quickstart runs as written (with fewer steps), after a short `jft train`."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quickstart_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("JFT_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.chdir(tmp_path)
    import jft

    # What `jft train` leaves behind, cut short: the default recipe's pretrain stage.
    spec = importlib.util.spec_from_file_location("recipe", ROOT / "configs/digits_transfer.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    pre = recipe.get_config().pretrain
    pre.num_steps, pre.progress = 5, False
    jft.train.train_and_evaluate(pre, "runs/digits_transfer/pretrain")

    blocks = _quickstart_blocks()
    assert len(blocks) == 2
    first = blocks[0].replace("config.num_steps = 300", "config.num_steps = 8")
    assert first != blocks[0]
    namespace: dict = {}
    exec(compile(first, "README quickstart 1", "exec"), namespace)
    assert 0.0 <= namespace["result"]["eval/accuracy"] <= 1.0
    assert (tmp_path / "digits59.safetensors").exists()
    exec(compile(blocks[1], "README quickstart 2", "exec"), namespace)
    assert namespace["report"].loaded and np.isfinite(float(namespace["metrics"]["loss"]))
    assert "params/head/kernel" in namespace["report"].kept
