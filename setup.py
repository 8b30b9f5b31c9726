"""Which packages the wheel holds; everything else about jft is in pyproject.toml.

The recipes stay in the top-level ``configs/`` and ship inside the package as
``jft.configs``, so a wheel install runs ``jft train --config digits_mlp`` from any
folder. pyproject.toml alone cannot both find the ``jft.*`` packages and add a
mapped one, hence this file.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["jft", "jft.*"]), "jft.configs"],
    package_dir={"jft.configs": "configs"},
)
