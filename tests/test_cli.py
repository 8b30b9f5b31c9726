"""The ``jft`` console script is installed and answers ``--help``."""

import shutil
import subprocess
import sys


def test_console_script_prints_help():
    exe = shutil.which("jft")
    assert exe is not None, "the jft console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("train", "eval", "convert", "inspect"):
        assert command in out.stdout


def test_unknown_command_is_a_one_line_error():
    out = subprocess.run(
        [sys.executable, "-m", "jft.cli", "nonsense"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
