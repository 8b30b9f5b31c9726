"""Root conftest: doctests under jft/ get the set-up of tests/conftest.py (8 fake CPUs)."""

import pathlib
import runpy

runpy.run_path(str(pathlib.Path(__file__).parent / "tests" / "conftest.py"))
