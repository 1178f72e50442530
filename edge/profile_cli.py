"""`edge profile [--json]`: the firmware profile this machine matches, and its facts.

Reads files only (no agent, no socket), so it works before the agent is
installed; `--root` points it at another tree (a fixture, a mounted SD card).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from edge.policy import defaults, shown
from edge.profiles import AUTO, UNKNOWN, Profile, facts_of, resolve

__all__ = ["add_profile_parser"]

_DEFAULT_CONFIG = Path("/etc/edge/agent.toml")
_EXIT_OK = 0


def add_profile_parser(sub: Any) -> None:
    """Add `profile` to the `edge` command's subparsers."""
    p = sub.add_parser("profile", help="show the firmware profile and the board's facts")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                   help="read the board's files under DIR (default /)")
    p.add_argument("--machine", metavar="ARCH",
                   help="the architecture, as `uname -m` says it (default: this machine's)")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help=f"honour [node] profile of FILE (default {_DEFAULT_CONFIG} if it exists)")
    p.set_defaults(handler=_profile)


def _profile(args: argparse.Namespace) -> int:
    name, given, source = _configured(args.config)
    profile, machine = resolve(name, args.root, args.machine)
    facts = facts_of(profile, machine, args.root)
    policy = _policy(profile, given, source)
    shown_name = UNKNOWN if profile is None else profile.name
    if args.json:
        print(json.dumps({"profile": shown_name, "facts": facts, "policy": policy},
                         indent=2, sort_keys=True))
    else:
        print(_table(shown_name, name, facts, policy))
    sys.stdout.flush()
    return _EXIT_OK


def _configured(path: Path | None) -> tuple[str, frozenset[str], str]:
    """(`[node] profile`, the keys the config sets, its name); "auto" when there is none."""
    from edge.config import load_settings  # the agent's settings, only when a file is read

    if path is None and not _DEFAULT_CONFIG.exists():
        return AUTO, frozenset(), "<defaults>"
    settings = load_settings(path or _DEFAULT_CONFIG, must_exist=path is not None)
    return settings.node.profile, settings.given, settings.source


def _policy(profile: Profile | None, given: frozenset[str], source: str) -> dict[str, Any]:
    """Each policy default of the profile, and whether the config overrides it."""
    if profile is None:
        return {}
    return {key: {"value": value, "in_use": in_use, "overridden_by": None if in_use else source}
            for key, (value, in_use) in defaults(profile.policy, given).items()}


def _table(profile: str, configured: str, facts: dict[str, dict[str, Any]],
           policy: dict[str, Any]) -> str:
    how = "detected" if configured == AUTO else "from [node] profile"
    rows = [("profile", f"{profile} ({how})")]
    for key, fact in facts.items():
        if fact["value"] is None:
            rows.append((key, f"- ({fact['reason']})"))
        else:
            rows.append((key, _show(key, fact["value"])))
    for key, entry in policy.items():
        text = shown(key, entry["value"])
        if not entry["in_use"]:
            text += f" (not in use: {entry['overridden_by']} sets it)"
        rows.append((f"default {key}", text))
    width = max(len(key) for key, _ in rows)
    return os.linesep.join(f"{key:<{width}}  {text}" for key, text in rows)


def _show(key: str, value: Any) -> str:
    if key == "temperatures":
        return ", ".join(
            f"{z['type'] or z['zone']} {z['celsius']:.1f}°C" if z["celsius"] is not None
            else f"{z['type'] or z['zone']} - ({z.get('reason', 'unreadable')})" for z in value)
    if key == "throttled":
        on = [flag for flag, set_ in value.items() if flag != "raw" and set_]
        return f"{value['raw']} ({', '.join(on) or 'none'})"
    if key == "board":
        return (f"{value['type']} rev {value['revision']}, {value['memory_mib']} MiB,"
                f" {value['processor']}, made by {value['manufacturer']} ({value['code']})")
    if key == "memory":
        return f"{value['total_bytes'] / 1024**3:.1f} GiB"
    if key == "compatible":
        return ", ".join(value)
    if key == "l4t_release":
        return f"L4T {value['release']}"
    return str(value)
