"""train_and_evaluate: what a run writes (metrics.jsonl, TensorBoard, plots), eval, the NaN stop."""

from __future__ import annotations

import json
import os
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

import jft
from jft.train import logging as jft_logging


def _config(**overrides):
    c = jft.train.default_config()
    c.data.name = "digits"
    c.data.batch_size = 64
    c.model = ml_collections.ConfigDict({"name": "cnn", "widths": (8, 16)})
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "lr": 1e-2})
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_steps = 5
    c.num_steps = 40
    c.log_every = 5
    c.eval_every = 20
    c.progress = False
    c.checkpoint.every = 20
    for k, v in overrides.items():
        group, _, leaf = k.rpartition(".")
        (c[group] if group else c)[leaf] = v
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    os.environ.setdefault("JFT_DATA_DIR", str(tmp_path_factory.mktemp("tfds")))
    workdir = tmp_path_factory.mktemp("run")
    result = jft.train.train_and_evaluate(_config(), workdir)
    return workdir, result


def test_metrics_jsonl_holds_every_logged_step_and_eval(run):
    workdir, result = run
    records = jft_logging.read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    for r in records:
        for key in (
            "train/loss",
            "train/lr",
            "train/grad_norm",
            "train/update_norm",
            "train/param_norm",
        ):
            assert np.isfinite(r[key]), (key, r)
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [20, 40]
    for key in ("eval/loss", "eval/accuracy", "eval/precision", "eval/recall", "eval/f1"):
        assert 0.0 <= evals[-1][key] <= (1.0 if key != "eval/loss" else 100.0)
    # The schedule: warmup to 1e-2 over 5 steps, then a cosine down towards 0.
    lrs = [r["train/lr"] for r in records]
    assert lrs[0] < max(lrs) <= 1e-2
    tail = lrs[lrs.index(max(lrs)) :]
    assert all(a > b for a, b in zip(tail, tail[1:], strict=False)) and lrs[-1] < 1e-3
    # Ten digit classes, a CNN trained for 40 steps: far above chance.
    assert evals[-1]["eval/accuracy"] > 0.5
    assert result["eval/accuracy"] == pytest.approx(evals[-1]["eval/accuracy"])
    assert result["confusion_matrix"].shape == (10, 10)
    assert result["confusion_matrix"].sum() == jft.data.info(_config().data).num_examples["test"]


def test_tensorboard_events_and_plots_are_written(run):
    workdir, _ = run
    events = [p for p in (workdir / "tb").iterdir() if p.name.startswith("events.out.tfevents")]
    assert events and events[0].stat().st_size > 100
    for name in ("loss.png", "lr.png", "eval.png"):
        path = workdir / "plots" / name
        img = np.asarray(Image.open(path).convert("L"), dtype=float)
        assert img.shape[0] > 200 and img.shape[1] > 400
        assert img.std() > 10  # something is drawn, not a blank canvas
    # tensorboardX was loaded with torch hidden; torch is not left hidden.
    assert sys.modules.get("torch", "never imported") is not None


def test_restarting_a_finished_run_changes_nothing(run):
    workdir, result = run
    before = (workdir / "metrics.jsonl").read_text()
    again = jft.train.train_and_evaluate(_config(), workdir)
    assert again["step"] == 40
    assert again["eval/accuracy"] == pytest.approx(result["eval/accuracy"])
    # Its final evaluation is reported again but not logged again: each step once.
    assert (workdir / "metrics.jsonl").read_text() == before


def test_nonfinite_gradients_stop_the_run_with_a_clear_error(tmp_path):
    # A learning rate of 1e30 blows the weights up to Inf within a few steps.
    config = _config(num_steps=60, max_nonfinite_steps=3, eval_every=0)
    config.optimizer.lr = 1e30
    config.checkpoint.every = 2
    with pytest.raises(jft.train.NonFiniteError, match="3 steps in a row"):
        jft.train.train_and_evaluate(config, tmp_path)
    ck = jft.train.Checkpointer(str(tmp_path / "checkpoints"), every=0)
    last = ck.latest_step()
    ck.close()
    assert last is not None and last < 60
    params = jft.train.checkpoint.read_params(tmp_path)
    assert all(np.all(np.isfinite(v)) for v in params.values())


def test_unknown_config_key_is_named():
    config = _config()
    config.optimizer.lrr = 0.1
    with pytest.raises(jft.train.ConfigError, match="optimizer.lrr"):
        jft.train.train_and_evaluate(config, "/nonexistent/never/written")
    bad = _config()
    bad.nonsense = 1
    with pytest.raises(jft.train.ConfigError, match="'nonsense'"):
        jft.train.train_and_evaluate(bad, "/nonexistent/never/written")


def test_metric_writer_truncates_to_the_resume_point(tmp_path):
    writer = jft_logging.MetricWriter(tmp_path)
    for step in range(1, 6):
        writer.write(step, {"train/loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # a line cut off by SIGKILL
    writer = jft_logging.MetricWriter(tmp_path)
    writer.truncate(3)
    writer.write(4, {"train/loss": 40.0})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == [
        {"step": 1, "train/loss": 1.0},
        {"step": 2, "train/loss": 2.0},
        {"step": 3, "train/loss": 3.0},
        {"step": 4, "train/loss": 40.0},
    ]


def test_evaluate_rebuilds_the_run_and_reproduces_its_final_eval(run):
    # jft eval builds through the same Experiment as the run: same model, inputs,
    # loss and data, so the checkpoint's metrics are the run's own final ones.
    workdir, result = run
    ev = jft.train.evaluate(workdir)
    assert ev["step"] == 40
    assert ev["accuracy"] == pytest.approx(result["eval/accuracy"])
    assert ev["loss"] == pytest.approx(result["eval/loss"], rel=1e-5)
    np.testing.assert_array_equal(ev["confusion_matrix"], result["confusion_matrix"])


@pytest.mark.parametrize(
    ("program", "needle"),
    [
        ("quadratic", "give 'module:function'"),
        ("jft.train.quadratic:nothing", "does not import"),
        ("jft.nonexistent:run", "does not import"),
        ("jft.train.quadratic:json", "not a function"),
    ],
)
def test_a_program_entry_point_must_name_a_function(program, needle, tmp_path):
    workdir = tmp_path / "never"
    with pytest.raises(jft.train.ConfigError, match=needle):
        jft.train.train_and_evaluate({"program": program}, workdir)
    assert not workdir.exists()


def test_parallel_mode_is_checked_once_with_the_config():
    # jft.train.parallel.check, called by the config: one line, before anything is written.
    for overrides, needle in (
        ({"parallel": "ddp"}, "parallel must be one of"),
        ({"parallel": "pmap", "fsdp": True}, "fsdp=True needs parallel='jit'"),
    ):
        with pytest.raises(jft.train.ConfigError, match=needle):
            jft.train.train_and_evaluate(_config(**overrides), "/nonexistent/never/written")
