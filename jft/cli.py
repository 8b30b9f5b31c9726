"""The ``jft`` command: ``jft train | eval | convert | inspect``."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jft", description="Fine-tune pretrained models in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help="train and evaluate a recipe from configs/ (coming soon)")
    sub.add_parser("eval", help="evaluate a checkpoint (coming soon)")
    sub.add_parser("convert", help="convert a weights file to a Flax checkpoint (coming soon)")
    sub.add_parser("inspect", help="list the tensors in a weights file (coming soon)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jft`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    print(f"jft: '{args.command}' is not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
