"""`swarmnet` command line: thin parsers that build configs and call the roles."""

from __future__ import annotations

import argparse
import sys

from swarmnet import __version__
from swarmnet.cli import coordinator, demo, identity, join, status, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmnet", description=__doc__)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    parser.add_argument("--version", action="version", version=f"swarmnet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (coordinator, join, train, status, demo, identity):
        module.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
