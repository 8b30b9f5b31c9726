"""The ``jft`` command: help, one-line errors for user mistakes, eval, inspect, convert,
config, recipes."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

STEPS = 6


def _env(data_dir, **extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop("JFT_DEBUG", None)
    env.update(JFT_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu", **extra)
    return env


def _jft(*args, data_dir, cwd=None, timeout=300, **env):
    return subprocess.run(
        [sys.executable, "-m", "jft.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(data_dir, **env),
        cwd=cwd,
    )


def _fails_fast(out, *needles, command="train"):
    """Exit status 2, no traceback, nothing compiled, the last line names the problem."""
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert "Compiling" not in out.stderr, "compiled before failing (JAX_LOG_COMPILES=1)"
    last = out.stderr.splitlines()[-1]
    assert last.startswith(f"jft {command}: error:"), last
    for needle in needles:
        assert needle in last, (needle, last)
    return last


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("cli") / "run"
    out = _jft(
        "train",
        "--config=digits_mlp",
        f"--workdir={workdir}",
        f"--config.num_steps={STEPS}",
        "--config.eval_every=3",
        "--config.checkpoint.every=3",
        "--config.progress=False",
        data_dir=data_dir,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval/accuracy" in out.stdout
    return workdir


def test_console_script_prints_help():
    exe = shutil.which("jft")
    assert exe is not None, "the jft console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("train", "eval", "convert", "inspect", "config", "recipes", "--debug"):
        assert command in out.stdout


def test_unknown_command_is_a_one_line_error():
    out = subprocess.run(
        [sys.executable, "-m", "jft.cli", "nonsense"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config=digits_mlp", "--config.optimizer.lrr=0.1"], "optimizer.lrr"),
        (["--config=digits_mlp", "--config.nonsense=1"], "nonsense"),
        (["--config=digits_mlp", "--config.num_steps=abc"], "num_steps"),
        (["--config=configs/no_such_recipe.py"], "no_such_recipe"),
        (["--config=digits_mlp", "--config.data.name=mnist"], "mnist"),
        (["--config=digits_mlp", "--config.optimizer.name=adamx"], "adamx"),
        (["--config=digits_mlp", "--config.model.name=resnet9"], "resnet9"),
        (["--config=cifar10_resnet18_finetune"], "init.path"),
        (["--config=digits_mlp", "--config.init.path=/no/such/weights.pth"], "weights.pth"),
    ],
)
def test_user_mistakes_are_one_line_errors(args, needle, data_dir, tmp_path):
    out = _jft("train", *args, f"--workdir={tmp_path / 'w'}", data_dir=data_dir, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("jft train: error:") and needle in lines[0], lines[0]


def test_eval_reports_the_trained_runs_metrics(run_dir, data_dir):
    out = _jft("eval", f"--workdir={run_dir}", data_dir=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "accuracy" in out.stdout and f"step  {STEPS}".replace("  ", " ") in " ".join(
        out.stdout.split()
    )
    assert "confusion matrix" in out.stdout


def test_inspect_lists_a_checkpoint_with_frozen_status(run_dir, data_dir, tmp_path):
    out = _jft("inspect", str(run_dir), data_dir=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "backbone/dense_0/kernel" in out.stdout and "64x128" in out.stdout
    recipe = tmp_path / "frozen.py"
    recipe.write_text(
        "from jft.train import default_config\n"
        "def get_config(arg=None):\n"
        "    c = default_config()\n"
        "    c.frozen = ('backbone/.*',)\n"
        "    return c\n"
    )
    out = _jft("inspect", str(run_dir), f"--config={recipe}", data_dir=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {ln.split()[0]: ln.split()[-1] for ln in out.stdout.splitlines() if "/" in ln}
    assert any(k.endswith("backbone/dense_0/kernel") and v == "frozen" for k, v in rows.items())
    assert any(k.endswith("head/kernel") and v == "trainable" for k, v in rows.items())


def test_export_then_convert_and_inspect_the_weights(run_dir, data_dir, tmp_path):
    import jft

    dst = tmp_path / "params.safetensors"
    jft.train.export(run_dir, dst)
    out = _jft("inspect", str(dst), data_dir=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "params/head/kernel" in out.stdout
    out = _jft("convert", str(dst), str(tmp_path / "ckpt"), "--arch=jft", data_dir=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    again = _jft("convert", str(dst), str(tmp_path / "ckpt"), "--arch=jft", data_dir=data_dir)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr


BROKEN_RECIPES = {
    "syntax": ("import ml_collections\ndef get_config(:\n    pass\n", ["line 2"]),
    "raises": (
        "def get_config(arg=None):\n    raise ValueError('no data here')\n",
        ["no data here"],
    ),
    "no_get_config": ("CONFIG = {}\n", ["get_config"]),
    "bad_import": ("import no_such_module_xyz\n", ["no_such_module_xyz"]),
    "not_a_config": ("def get_config(arg=None):\n    return 3\n", ["ConfigDict"]),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_RECIPES))
def test_a_broken_recipe_is_one_line_naming_the_file(kind, tmp_path):
    source, needles = BROKEN_RECIPES[kind]
    recipe = tmp_path / f"{kind}_recipe.py"
    recipe.write_text(source)
    out = _jft("train", f"--config={recipe}", data_dir=tmp_path, JAX_LOG_COMPILES="1")
    _fails_fast(out, str(recipe), *needles)


def test_debug_shows_the_traceback(tmp_path):
    recipe = tmp_path / "raises.py"
    recipe.write_text(BROKEN_RECIPES["raises"][0])
    for args, env in (
        (["--debug", "train"], {}),
        (["train", "--debug"], {}),
        (["train"], {"JFT_DEBUG": "1"}),
    ):
        out = _jft(*args, f"--config={recipe}", data_dir=tmp_path, **env)
        assert out.returncode == 1, (args, env, out.stderr[-2000:])
        assert "Traceback" in out.stderr and "ValueError: no data here" in out.stderr


def test_unknown_key_lists_the_keys_of_its_group(tmp_path):
    out = _jft("train", "--config=digits_mlp", "--config.optimizer.lrr=1", data_dir=tmp_path)
    last = _fails_fast(out)
    assert last == "jft train: error: unknown config key 'optimizer.lrr'; optimizer has: lr, name"


def test_convert_unknown_arch_lists_the_known_ones(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    src = tmp_path / "w.safetensors"
    save_file({"a": np.zeros(2, np.float32)}, str(src))
    out = _jft("convert", str(src), str(tmp_path / "out"), "--arch=nosucharch", data_dir=tmp_path)
    _fails_fast(out, "nosucharch", "resnet", "bert", command="convert")
    assert not (tmp_path / "out").exists()


def test_os_error_is_one_line_with_the_path(monkeypatch, capsys, tmp_path):
    # jft's own code turns the OSErrors it expects (a workdir, a weights file) into
    # JftErrors; any other one still comes out as one line with the path and reason.
    from jft import cli

    blocker = tmp_path / "a_file"
    blocker.write_text("")

    def write_beside(args):
        print("some output first")
        (blocker / "out.txt").write_text("x")  # a real OSError: a file is in the way

    monkeypatch.setattr(cli, "_recipes", write_beside)
    assert cli.main(["recipes"]) == 2
    out, err = capsys.readouterr()
    assert out == "some output first\n"
    assert err == f"jft recipes: error: '{blocker / 'out.txt'}': Not a directory\n"


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    from jft import cli

    def bug(args):
        raise ZeroDivisionError("a bug in jft")

    monkeypatch.setattr(cli, "_recipes", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["recipes"])


def test_an_open_progress_bar_prints_before_the_error(monkeypatch, capsys):
    # A command that fails with its tqdm bar still open (in a frame of the traceback):
    # the bar's last redraw must come before the error line, not when it is freed.
    from tqdm import tqdm

    from jft import cli
    from jft.errors import JftError

    def fails_mid_loop(args):
        bar = tqdm(total=10, mininterval=0)
        bar.update(3)
        raise JftError("stopped at step 3")

    monkeypatch.setattr(cli, "_recipes", fails_mid_loop)
    assert cli.main(["recipes"]) == 2
    err = capsys.readouterr().err
    assert "3/10" in err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines[-1] == "jft recipes: error: stopped at step 3", lines[-3:]


def test_config_prints_every_key_with_its_value(tmp_path):
    import jft

    out = _jft("config", "digits_mlp", "--config.optimizer.lr=0.5", data_dir=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    shown = dict(ln.split("  # default: ")[0].split(" = ", 1) for ln in lines)
    assert shown["optimizer.lr"] == "0.5" and shown["model.name"] == "'mlp'"
    # A value the recipe or an override changed names its default; adam's own are shown.
    assert "optimizer.lr = 0.5  # default: 0.001" in lines and "optimizer.b1 = 0.9" in lines
    assert shown["num_steps"] == "600" and shown["init.skip"] == "('head/.*',)"

    def keys(config, prefix=""):
        for k, v in config.items():
            if hasattr(v, "items") and len(v) and k not in ("model", "optimizer"):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    defaults = set(keys(jft.train.default_config()))
    assert defaults - {"model", "optimizer"} <= set(shown), defaults - set(shown)

    staged = _jft("config", data_dir=tmp_path)  # the default recipe, with stages
    assert staged.returncode == 0, staged.stderr[-2000:]
    assert "stages = ('pretrain', 'finetune', 'unfreeze', 'scratch')" in staged.stdout
    assert "finetune.frozen = " in staged.stdout and "scratch.seed = 0" in staged.stdout
    # A recipe that needs weights still shows its keys.
    needs = _jft("config", "cifar10_resnet18_finetune", data_dir=tmp_path)
    assert needs.returncode == 0 and "init.required = True" in needs.stdout, needs.stderr


def test_recipes_lists_every_recipe_with_its_summary(tmp_path):
    configs = pathlib.Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.stem for p in configs.glob("*.py") if not p.name.startswith("_"))
    out = _jft("recipes", data_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {ln.split()[0]: ln for ln in out.stdout.splitlines()[:-1]}
    assert sorted(rows) == names
    assert "The 128→10 MLP with Adam" in rows["digits_mlp"]
    listed = _jft("train", "--list", data_dir=tmp_path)
    assert listed.returncode == 0 and listed.stdout == out.stdout
