"""The socket API refuses what MQTT cannot carry and survives clients that misbehave."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge.api import ApiServer
from tests.conftest import AgentFactory
from tests.support.expect import assert_error, publish_items


@pytest.mark.parametrize(
    ("topic", "needle"),
    [
        ("a\nb", "control character U+000A"),
        ("ok\u0001ctl", "control character U+0001"),
        ("a\u007fb", "control character U+007F"),
        ("bad\ufffe", "non-character U+FFFE"),
        ("a\u0000b", "control character U+0000"),
        ("x" * 1025, "at most 1024"),
    ],
)
def test_topics_mqtt_cannot_carry_are_refused_with_the_reason(
    agent_factory: AgentFactory, topic: str, needle: str
) -> None:
    agent = agent_factory(None)
    answer = agent.publish(topic, "x")
    assert_error(answer, "bad_request")
    assert needle in answer["error"]["message"]
    assert agent.status()["queue"]["depth"] == 0


def test_lone_surrogate_topic_is_a_bad_request(agent_factory: AgentFactory) -> None:
    agent = agent_factory(None)
    with agent.connect() as api:
        api.send_raw(b'{"op":"publish","topic":"a\\ud800b","data":"x"}\n')
        assert_error(api.read_response(), "bad_request")


@pytest.mark.parametrize("ttl", ["1e999", "1e300", "-1"])
def test_ttl_must_be_finite_and_not_negative(agent_factory: AgentFactory, ttl: str) -> None:
    agent = agent_factory(None)
    with agent.connect() as api:
        api.send_raw(f'{{"op":"publish","topic":"t","data":"x","ttl":{ttl}}}\n'.encode())
        assert_error(api.read_response(), "bad_request")


def test_missing_op_and_non_utf8_lines_get_clear_codes(agent_factory: AgentFactory) -> None:
    agent = agent_factory(None)
    with agent.connect() as api:
        api.send_raw(b'{"topic":"t"}\n')
        missing = api.read_response()
        api.send_raw(b"\xff\xfe{\x00}\x00\n")
        utf16 = api.read_response()
        assert api.request({"op": "status"})["ok"] is True
    assert_error(missing, "bad_request")
    assert "'op'" in missing["error"]["message"]
    assert_error(utf16, "bad_json")
    assert "UTF-8" in utf16["error"]["message"]


def test_a_client_hanging_up_mid_pipeline_neither_floods_the_log_nor_loses_messages(
    agent_factory: AgentFactory,
) -> None:
    agent = agent_factory(None)
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in publish_items(2000))
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(agent.socket_path))
        s.sendall(lines)
        s.close()  # never reads an answer
    agent.wait_status(lambda st: st["queue"]["depth"] == 6000, 15, what="6000 stored")
    log = agent.log_path.read_text()
    assert log.count("socket.send() raised exception") < 5, "log flooded by hung-up clients"


async def test_connections_past_the_cap_are_told_busy_and_the_rest_served(
    tmp_path: Path,
) -> None:
    async def status(req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    def submit(*args: Any) -> Any:
        raise AssertionError("no publish here")

    server = ApiServer(
        tmp_path / "s.sock", max_line=4096, submit=submit, handlers={"status": status},
        max_connections=2,
    )
    await server.start()
    try:
        held = [await asyncio.open_unix_connection(str(server.path)) for _ in range(2)]
        for reader, writer in held:  # both served
            writer.write(b'{"op":"status"}\n')
            assert json.loads(await reader.readline()) == {"ok": True}
        reader, writer = await asyncio.open_unix_connection(str(server.path))
        busy = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert busy["error"]["code"] == "busy"
        assert await reader.read() == b""  # and hung up
        writer.close()
        for _, w in held:
            w.close()
            await w.wait_closed()
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_unix_connection(str(server.path))
        writer.write(b'{"op":"status"}\n')
        assert json.loads(await reader.readline()) == {"ok": True}
        writer.close()
    finally:
        await server.close()


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_agent_refuses_a_socket_directory_others_can_write(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)  # 0770: a member of the group could swap the socket too
    config = tmp_path / "a.toml"
    config.write_text(
        f'[node]\nid = "n"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[api]\nsocket = "{shared / "agent.sock"}"\n[telemetry]\ninterval = "0s"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "edge", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 1
    assert f"socket directory {shared}" in proc.stderr
    assert "writable by its group or others" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_deeply_nested_json_is_bad_json_and_earlier_pipelined_answers_are_all_written(
    agent_factory: AgentFactory,
) -> None:
    agent = agent_factory(None)
    lines = [json.dumps(r).encode() + b"\n" for r in publish_items(100)]
    lines.append(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    lines.append(json.dumps({"op": "status"}).encode() + b"\n")
    with agent.connect(timeout=15) as api:
        answers = api.pipeline(lines)
        again = api.request({"op": "status"})  # the connection is still served
    assert [a.get("ok") for a in answers[:100]] == [True] * 100, answers[:3]
    assert_error(answers[100], "bad_json")
    assert answers[101]["ok"] is True and again["ok"] is True
    assert again["api"]["rejected"].get("bad_json") == 1
    assert again["queue"]["depth"] == 100
    log = agent.log_path.read_text()
    assert "Traceback" not in log and "RecursionError" not in log


async def test_a_request_that_fails_unexpectedly_is_answered_internal_error_and_the_rest_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def status(req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    async def broken(req: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("a bug")

    def submit(topic: str, *args: Any) -> Any:
        if topic == "boom":
            raise KeyError("another bug")
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return 7, "00" * 16, fut

    server = ApiServer(
        tmp_path / "s.sock", max_line=4096, submit=submit,
        handlers={"status": status, "broken": broken},
    )
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(server.path))
        writer.write(
            b'{"op":"publish","topic":"t"}\n{"op":"broken"}\n{"op":"publish","topic":"boom"}\n'
            b'{"op":"broken"}\n{"op":"status"}\n'
        )
        answers = [json.loads(await asyncio.wait_for(reader.readline(), 5)) for _ in range(5)]
        writer.close()
    finally:
        await server.close()
    assert answers[0]["ok"] is True
    for answer in answers[1:4]:
        assert_error(answer, "internal_error")
    assert answers[4] == {"ok": True}
    assert server.rejected["internal_error"] == 3
    assert caplog.text.count("request failed unexpectedly") == 1  # rate-limited


def test_sigterm_with_clients_connected_and_publishes_in_flight_stops_cleanly(
    agent_factory: AgentFactory,
) -> None:
    agent = agent_factory(None)
    idle = agent.connect()
    busy = agent.connect()
    assert idle.request({"op": "status"})["ok"] is True
    busy.send_raw(b"".join(json.dumps(r).encode() + b"\n" for r in publish_items(3000)))
    try:
        assert agent.terminate(timeout=15) == 0
    finally:
        idle.close()
        busy.close()
    log = agent.log_path.read_text()
    tail = log[log.rindex("--- start #"):]
    assert "stopped" in tail
    for bad in ("ERROR", "Traceback", "CancelledError", "never awaited", "RuntimeWarning"):
        assert bad not in tail, f"{bad!r} in the log at shutdown:\n{tail[-3000:]}"


def test_a_socket_path_that_is_a_regular_file_is_refused_not_deleted(tmp_path: Path) -> None:
    important = tmp_path / "important.txt"
    important.write_text("keep me")
    config = tmp_path / "a.toml"
    config.write_text(
        f'[node]\nid = "n"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[api]\nsocket = "{important}"\n[telemetry]\ninterval = "0s"\n'
        '[discovery]\nenabled = false\n[local]\nurl = ""\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "edge", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 1
    assert f"[api] socket {important} exists and is not a socket" in proc.stderr
    assert important.read_text() == "keep me"
