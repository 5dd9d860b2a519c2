"""The ``lightning-recipe`` console script. Reserved: the ``check`` command arrives with the sanity-run mode."""

from __future__ import annotations

import argparse
import sys

from lightning_recipe import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-recipe",
        description="Karpathy's recipe for training neural networks, as PyTorch Lightning callbacks. "
        "The `check` command (a sanity run of a model from the command line) is not available yet; "
        "use the callbacks in your Trainer.",
    )
    parser.add_argument("--version", action="version", version=f"lightning_recipe {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
