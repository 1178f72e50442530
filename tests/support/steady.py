"""A socket-API client that publishes one message after another, recording every answer."""

from __future__ import annotations

import itertools
import threading
import time

from .agent import Agent, ApiError, publish_request

__all__ = ["SteadyPublisher"]


class SteadyPublisher(threading.Thread):
    """Publish on one connection every `interval` seconds until stopped.

    `accepted` holds the seqs answered ok, `refused` the error codes counted,
    `answered_at` the monotonic time of every answer.
    """

    def __init__(self, agent: Agent, interval: float = 0.003, topic: str = "sensors/t") -> None:
        super().__init__(name="steady-publisher", daemon=True)
        self.agent = agent
        self.interval = interval
        self.topic = topic
        self.accepted: list[int] = []
        self.refused: dict[str, int] = {}
        self.answered_at: list[float] = []
        self.failure: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with self.agent.connect(timeout=10) as api:
                for i in range(1_000_000):
                    if self._halt.is_set():
                        return
                    answer = api.request(publish_request(self.topic, f"m{i}"))
                    self.answered_at.append(time.monotonic())
                    if answer.get("ok") is True:
                        self.accepted.append(int(answer["seq"]))
                    else:
                        code = str(answer.get("error", {}).get("code"))
                        self.refused[code] = self.refused.get(code, 0) + 1
                    time.sleep(self.interval)
        except (OSError, ApiError) as exc:
            self.failure = exc

    def stop(self) -> None:
        """Stop, and fail if the publisher could not go on."""
        self._halt.set()
        self.join(timeout=15)
        assert not self.is_alive(), "publisher did not stop"
        assert self.failure is None, f"publisher failed: {self.failure!r}"

    def longest_wait(self) -> float:
        """The longest time between two answers, in seconds."""
        return max((b - a for a, b in itertools.pairwise(self.answered_at)), default=0.0)
