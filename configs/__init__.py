"""The recipes, one per file, each a ``get_config(arg=None)``; installed as ``jft.configs``.

``jft recipes`` lists them with the first line of each docstring.
"""
