"""A test peer's subprocess (the agent, a mosquitto): an ordered stop, and its log's tail."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

__all__ = ["read_log_tail", "terminate_or_kill"]


def terminate_or_kill(
    proc: subprocess.Popen[bytes], timeout: float, what: str, kill: Callable[[], None]
) -> None:
    """SIGTERM `proc` and wait `timeout` for it to exit; else kill() it and raise RuntimeError."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill()
        raise RuntimeError(f"{what} ignored SIGTERM for {timeout}s") from None


def read_log_tail(path: Path, lines: int, missing: str) -> str:
    """The last `lines` lines of the log at `path`, or `missing` when there is none yet."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return missing
    return "\n".join(text.splitlines()[-lines:])
