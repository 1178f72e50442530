"""What `edge install` writes: the unit, its snippets and a commented config file.

The unit and the snippets are the files of systemd/ (a checkout's, or the copy
a wheel installs under share/edge-agent/), made to fit the machine: the unit
runs the `edge` of this installation, and a device gets the agent's lines of
the snippets, not the registry's.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from edge.install_paths import InstallError

__all__ = ["CONFIG_TEXT", "UNIT", "agent_only", "edge_command", "system_files", "unit_text"]

UNIT = "edge-agent.service"
_TEMPLATE_EDGE = "/usr/local/bin/edge"  # what systemd/edge-agent.service runs
CONFIG_TEXT = """\
# edge agent configuration. Every key has a default; see docs/configuration.md.
# `edge config check /etc/edge/agent.toml` checks this file without running it.

[node]
# id = "auto"                  # from /etc/machine-id
# profile = "auto"             # the firmware profile: `edge profile` shows the one found
# labels = { site = "greenhouse-3" }

[uplink]
# url = "mqtt://broker.example:1883"   # "" keeps every message in the outbox
# keepalive = "30s"

[queue]
# max_bytes = "256MiB"
# on_full = "drop-oldest"      # or "reject"

# [services.sensor]
# command = ["/usr/local/bin/sensor"]
# restart = "always"
"""


def edge_command(executable: str) -> list[str]:
    """How the unit runs this installation of edge: the `edge` script beside the running
    interpreter, else the interpreter with `-m edge` (never the first `edge` on $PATH)."""
    python = Path(os.path.abspath(executable))
    script = python.parent / "edge"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [str(python), "-m", "edge"]


_PLAIN = re.compile(r"[\w/.,:@+=-]+")


def _unit_word(word: str) -> str:
    """`word` as one word of an ExecStart= line (systemd.service(5) quoting)."""
    if _PLAIN.fullmatch(word):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("%", "%%").replace("$", "$$") + '"'


def unit_text(template: str, command: list[str], source: Path) -> str:
    """The unit as installed: its ExecStart runs `command`, its header says who wrote it."""
    start = f"ExecStart={_TEMPLATE_EDGE} "
    if start not in template or "[Unit]" not in template:
        raise InstallError(f"{source}: no [Unit] or no {start.strip()}: not edge's unit file")
    head = ("# Written by `edge install`, from\n"
            f"# {source}.\n"
            "# `edge install` rewrites it and `edge uninstall` removes it: change settings\n"
            "# in a drop-in instead (systemctl edit edge-agent).\n")
    body = template[template.index("[Unit]"):]
    return head + body.replace(start, f"ExecStart={' '.join(map(_unit_word, command))} ")


def agent_only(text: str) -> str:
    """A snippet without the registry's lines: a device runs only the agent."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if "edge-registry" not in line)


def system_files() -> Path:
    """The unit and snippets: the checkout's `systemd/`, else the installed share dir."""
    for directory in (Path(__file__).resolve().parent.parent / "systemd",
                      Path(sys.prefix) / "share" / "edge-agent" / "systemd"):
        if (directory / UNIT).is_file():
            return directory
    raise InstallError("the systemd unit files are not installed with this edge"
                       f" (looked in {sys.prefix}/share/edge-agent/systemd)")
