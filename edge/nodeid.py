"""The node id: how a device names itself in topics, the registry and on the LAN."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
from pathlib import Path

__all__ = ["default_node_id", "validate_node_id"]

_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_-]")


def default_node_id(
    machine_id_path: Path = Path("/etc/machine-id"), hostname: str | None = None
) -> str:
    """Return a stable id from the machine id, else from the (sanitized) hostname."""
    try:
        machine_id = machine_id_path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        machine_id = ""
    # systemd writes "uninitialized" until first boot completes; that is not an id.
    if machine_id and machine_id != "uninitialized":
        # Keyed like sd_id128_get_machine_app_specific(): the id reveals nothing
        # about the machine id, which systemd asks to keep confidential.
        digest = hmac.new(machine_id.encode(), b"edge-node-id", hashlib.sha256).hexdigest()
        return "edge-" + digest[:12]
    name = socket.gethostname() if hostname is None else hostname
    return _NOT_ALLOWED.sub("-", name)[:64] or "edge"


def validate_node_id(s: str) -> str:
    """Return `s` if it is a valid node id, else raise ValueError saying what is allowed."""
    if isinstance(s, str) and _NODE_ID.fullmatch(s):
        return s
    got = json.dumps(s, ensure_ascii=False, default=str)
    raise ValueError(f"expected a node id of 1 to 64 characters A-Z a-z 0-9 _ -, got {got}")
