"""The `memmix` command. Each sub-command is a thin wrapper over the library.

Sub-commands register themselves through one `_add_<name>` function each, so separate
sub-commands never share code paths here.
"""
from __future__ import annotations

import argparse
import sys


def _add_recall(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recall", help="MQAR associative-recall benchmark: train and compare models")
    p.set_defaults(func=lambda args: _not_ready("recall"))


def _not_ready(name: str) -> int:
    print(f"memmix {name}: not available in this build", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memmix", description="Mixture-of-Memories models: train, evaluate, benchmark")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_recall(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
