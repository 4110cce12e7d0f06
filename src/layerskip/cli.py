"""Command line: argument parsing and printing only. Everything here is reachable from Python.

Subcommands live beside the code they drive; each module exposes `add_parser(subparsers)`, which
registers a parser whose `func(args) -> int` does the work:
  generate, demo        layerskip.decoding.cli
  bench, sweep, analyze layerskip.evaluation.cli
  train, selfgen        layerskip.training.cli
"""
from __future__ import annotations

import argparse
import importlib
import sys

from layerskip.errors import LayerSkipError

_COMMAND_MODULES = (
    "layerskip.decoding.cli",
    "layerskip.evaluation.cli",
    "layerskip.training.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerskip",
        description="LayerSkip: early-exit training and self-speculative decoding for transformers models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a command group not built yet
            if e.name != name:
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LayerSkipError as e:
        print(f"layerskip: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerskip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
