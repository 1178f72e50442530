"""`edge fleet ...`: a client of the registry's HTTP API (standard library only)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_fleet_parser"]


def add_fleet_parser(sub: Any) -> None:
    """Add `fleet ls/show/desired` to the `edge` command's subparsers."""
    fleet = sub.add_parser("fleet", help="the fleet as the registry sees it")
    fleet.set_defaults(handler=_todo)


def _todo(args: argparse.Namespace) -> int:
    raise NotImplementedError("edge fleet")
