"""What the bounded CBOR check (edge/cbor_safe.py) costs per decode.

Run from the repository root:

    .venv/bin/python bench/cbor_safe.py

Times three decodes of outside input as the agent and the registry do them, with
the structure check switched off and on in the same run, against cbor2.loads
alone (the baseline). Best of 30 repeats: the machine may be shared.
"""

from __future__ import annotations

import os
import sys
import timeit
from importlib.metadata import version

import cbor2

from edge import cbor_safe
from edge.documents import decode_document
from edge.downlink import parse_down
from edge.envelope import Envelope, new_message_id

ENVELOPE = Envelope(
    id=new_message_id(), node="pi-kitchen-01", seq=104_857, ts=1_796_320_000.123,
    topic="sensors/kitchen/temperature", ct="application/json",
    data=b'{"t": 21.5, "rh": 40.2, "unit": "C", "sensor": "bme280", "ok": true}', prio=1,
).encode()
DOWN = cbor2.dumps({"v": 1, "data": {"valve": 3, "open": True}, "ct": "application/cbor",
                    "id": bytes(16), "ts": 1_796_320_000.5})
REPORTED = cbor2.dumps({
    "v": 1, "node": "pi-kitchen-01", "version": 1_796_320_000_123, "ts": 1_796_320_000.5,
    "agent": "0.1.0", "profile": "raspberrypi-4", "labels": {"site": "a"},
    "services": [{"name": n, "state": "running", "reason": None, "pid": 1234, "restarts": 0,
                  "last_exit": None, "source": "config"} for n in ("web", "tick")],
    "peers": [{"node": "pi-2", "state": "up", "addresses": ["198.18.0.20"],
               "last_seen": 1_796_320_000.1}],
    "queue": {"depth": 0, "bytes": 0, "oldest_age": None, "dropped": 0, "expired": 0,
              "dead": 0},
    "uplink": {"state": "online", "since": 1.0, "connects": 1, "last_error": None},
    "desired_applied": 3, "desired": None, "desired_rejected": None,
})
CASES = (
    ("Envelope.decode", ENVELOPE, lambda: Envelope.decode(ENVELOPE)),
    ("parse_down (down topic)", DOWN, lambda: parse_down(DOWN)),
    ("decode_document (reported)", REPORTED,
     lambda: decode_document(REPORTED, 512 * 1024, "reported")),
)


def best_us(fn: object, number: int = 2000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=30)) / number * 1e6  # type: ignore[arg-type]


def main() -> int:
    print(f"edge bounded-CBOR benchmark; {os.cpu_count()} CPUs, load avg"
          f" {os.getloadavg()[0]:.2f}, cbor2 {version('cbor2')}")
    print(f"{'decode':28} {'bytes':>5} {'cbor2.loads':>11} {'unchecked':>10} {'checked':>8}"
          f" {'check':>6} {'checked/unchecked':>17}")
    real = cbor_safe.check
    for name, frame, call in CASES:
        raw = best_us(lambda frame=frame: cbor2.loads(frame))
        cbor_safe.check = lambda *a, **k: None  # type: ignore[assignment]
        try:
            unchecked = best_us(call)
        finally:
            cbor_safe.check = real
        checked = best_us(call)
        scan = best_us(lambda frame=frame: cbor_safe.check(frame))
        print(f"{name:28} {len(frame):>5} {raw:>9.1f}us {unchecked:>8.1f}us {checked:>6.1f}us"
              f" {scan:>4.1f}us {checked / unchecked:>17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
