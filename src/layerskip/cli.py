"""Command line: argument parsing and printing only. Everything here is reachable from Python.

Subcommands live beside the code they drive; each module exposes `add_parser(subparsers)`, which
registers a parser whose `func(args) -> int` does the work:
  generate, demo        layerskip.decoding.cli
  bench, sweep, analyze layerskip.evaluation.cli
  train, selfgen        layerskip.training.cli
  serve                 layerskip.serving.cli
A user mistake (LayerSkipError) is one line on stderr and exit code 2; an option that has no effect
(LayerSkipWarning) is one warning line on stderr.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from layerskip.decoding import cli as decoding_cli
from layerskip.decoding.config import LayerSkipWarning
from layerskip.errors import LayerSkipError
from layerskip.evaluation import cli as evaluation_cli
from layerskip.serving import cli as serving_cli
from layerskip.training import cli as training_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerskip",
        description="LayerSkip: early-exit training and self-speculative decoding for transformers models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (decoding_cli, evaluation_cli, training_cli, serving_cli):
        module.add_parser(subparsers)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, LayerSkipWarning):
        print(f"layerskip: warning: {message}", file=file or sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        warnings.simplefilter("always", LayerSkipWarning)
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
