"""One health check of a service: run a command, open a TCP connection or GET a URL.

Each returns None when the service is healthy, else what went wrong, in words.
All I/O is asyncio (streams, subprocesses): nothing here blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge.services import HealthSpec

__all__ = ["check"]

_STATUS_LINE_MAX = 4096


async def check(spec: HealthSpec, env: Mapping[str, str], cwd: Path | None,
                account: Mapping[str, Any] | None = None) -> str | None:
    """Run the check once within `spec.timeout`; None means healthy.

    An `exec` check runs with the service's environment, directory and `account`
    (Popen's user, group and extra_groups), as the service itself would.
    """
    try:
        async with asyncio.timeout(spec.timeout):
            if spec.kind == "exec":
                return await _exec(spec, env, cwd, account or {})
            if spec.kind == "tcp":
                return await _tcp(spec)
            return await _http(spec)
    except TimeoutError:
        return f"{spec.describe()}: no answer within {spec.timeout:g}s"
    except OSError as exc:
        return f"{spec.describe()}: {exc.strerror or exc}"


async def _exec(spec: HealthSpec, env: Mapping[str, str], cwd: Path | None,
                account: Mapping[str, Any]) -> str | None:
    process = await asyncio.create_subprocess_exec(
        *spec.exec, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, env=dict(env), cwd=cwd or "/",
        start_new_session=True, **account,
    )
    try:
        code = await process.wait()
    finally:
        if process.returncode is None:  # timed out or cancelled: the check's whole group goes
            # asyncio's child watcher reaps it; nothing here waits for that.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
    return None if code == 0 else f"{spec.describe()}: exited with {code}"


async def _tcp(spec: HealthSpec) -> str | None:
    _, writer = await asyncio.open_connection(spec.host, spec.port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def _http(spec: HealthSpec) -> str | None:
    reader, writer = await asyncio.open_connection(spec.host, spec.port)
    try:
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        writer.write(f"GET {spec.path} HTTP/1.0\r\nHost: {host}:{spec.port}\r\n"
                     "User-Agent: edge-health\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = line[:_STATUS_LINE_MAX].decode(errors="replace").split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return f"{spec.describe()}: not an HTTP answer: {line[:80]!r}"
    status = int(parts[1])
    return None if 200 <= status < 400 else f"{spec.describe()}: HTTP {status}"
