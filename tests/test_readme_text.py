"""The README's text fine-tuning example runs as written, on the real all-MiniLM-L6-v2."""

import pathlib
import re

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_text_example_trains_the_head_only():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Fine-tune a text model", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict = {}
    exec(compile(block, "README text example", "exec"), namespace)
    state, metrics = namespace["state"], namespace["metrics"]
    assert float(metrics["loss"]) < 0.2  # four sentences, separable: the head fits them
    assert set(state.trainable) == {"head"}  # the encoder is frozen: no optimizer state
    assert "backbone" in state.frozen and int(state.step) == 30
    state_size = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
    head = sum(np.size(x) for x in jax.tree.leaves(state.trainable))
    assert state_size <= 2 * head + 8  # Adam's mu and nu for the head, and counters
