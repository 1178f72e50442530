"""`edge registry serve`: argument parsing only; the server is imported when it runs."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_registry_parser"]


def add_registry_parser(sub: Any) -> None:
    """Add `registry serve` to the `edge` command's subparsers."""
    registry = sub.add_parser("registry", help="the fleet registry server")
    registry_sub = registry.add_subparsers(dest="registry_command", required=True,
                                           metavar="SUBCOMMAND")
    serve = registry_sub.add_parser("serve", help="run the registry server")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    raise NotImplementedError("edge registry serve")
