"""A TCP proxy in front of the broker that can make the network misbehave."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time

__all__ = ["FlakyProxy"]


class FlakyProxy:
    """Forward 127.0.0.1:port to the broker; optionally lose replies and cut links.

    In `flaky` mode each connection passes the broker's first reply (CONNACK)
    and then loses everything else the broker sends, and is cut (RST) `cut_after`
    seconds after it opened: a link that dies before any acknowledgement returns.
    """

    def __init__(self, upstream_port: int, cut_after: float = 1.0) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.flaky = True
        self.connections = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> FlakyProxy:
        self._accept_thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for t in self._threads:
            t.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                self._listener.settimeout(0.2)
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            t = threading.Thread(target=self._pipe, args=(client,), daemon=True)
            self._threads.append(t)
            t.start()

    def _pipe(self, client: socket.socket) -> None:
        flaky = self.flaky
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            client.close()
            return
        opened = time.monotonic()
        replies = 0
        try:
            while not self._stop.is_set():
                if flaky and time.monotonic() - opened >= self.cut_after:
                    # RST, not FIN: the way a dead mobile link looks to the agent.
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                ready, _, _ = select.select([client, upstream], [], [], 0.05)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        upstream.sendall(data)
                    elif not flaky or replies == 0:
                        replies += 1
                        client.sendall(data)
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                client.close()
            with contextlib.suppress(OSError):
                upstream.close()
