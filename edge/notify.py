"""systemd's notify protocol: READY, STATUS, WATCHDOG and STOPPING, over $NOTIFY_SOCKET.

With `Type=notify` systemd waits for READY=1; with `WatchdogSec=` it expects
WATCHDOG=1 at least that often and restarts the agent when the pings stop.
The pings come from the event loop itself, every half interval, so a loop
that blocks stops them. Without $NOTIFY_SOCKET (not under systemd) every call
does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "watchdog_interval"]

log = logging.getLogger("edge.notify")


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None without a watchdog."""
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None  # meant for another process (a service of ours inherited it)
    return int(usec) / 2 / 1_000_000


class Notifier:
    """Datagrams to systemd; errors are logged once and never stop the agent."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if address.startswith("@"):  # the abstract namespace
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        self.interval = watchdog_interval(env, os.getpid())
        self._sock: socket.socket | None = None
        self._failed = False
        self.sent = 0

    @property
    def enabled(self) -> bool:
        """Whether systemd asked for notifications."""
        return self._address is not None

    def send(self, *fields: str) -> None:
        """Send `FIELD=VALUE` lines as one datagram."""
        if self._address is None:
            return
        message = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self._address)
            self.sent += 1
            self._failed = False
        except OSError as exc:
            if not self._failed:  # once per outage, not once per ping
                log.warning("cannot notify systemd at %s: %s", self._address.lstrip("\0"),
                            exc.strerror or exc)
            self._failed = True

    def ready(self, status: str) -> None:
        """The agent is up: its outbox is recovered and its socket listens."""
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """A line for `systemctl status`."""
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        """Shutdown has begun."""
        self.send("STOPPING=1", "STATUS=stopping")

    async def run(self, status: Callable[[], str], every: float = 5.0) -> None:
        """Ping the watchdog every half interval and refresh STATUS, until cancelled."""
        if self._address is None:
            await asyncio.Event().wait()
        interval = self.interval
        tick = min(interval, every) if interval is not None else every
        last_status: str | None = None
        loop = asyncio.get_running_loop()
        status_due = loop.time()
        while True:
            if interval is not None:
                self.send("WATCHDOG=1")
            if loop.time() >= status_due:
                line = status()
                if line != last_status:
                    self.status(line)
                    last_status = line
                status_due = loop.time() + every
            await asyncio.sleep(tick)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
