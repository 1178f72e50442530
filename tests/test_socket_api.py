"""The local socket API: answers, error codes, and bad input that must not hurt the agent."""

from __future__ import annotations

import json

from tests.conftest import AgentFactory
from tests.support.expect import ID_HEX, accepted_seqs, assert_error

MiB = 1024 * 1024


def test_publish_answers_seq_and_id_after_commit(agent_factory: AgentFactory) -> None:
    agent = agent_factory(None)
    answers = [agent.publish("sensors/t", f"{i}") for i in range(3)]
    seqs = accepted_seqs(answers)
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
    assert len({a["id"] for a in answers}) == 3
    assert all(ID_HEX.fullmatch(a["id"]) for a in answers)
    assert agent.status()["queue"]["depth"] == 3


def test_status_and_queue_answer_the_documented_fields(agent_factory: AgentFactory) -> None:
    agent = agent_factory(None)
    status = agent.status()
    assert status["node"] == "node-a"
    uplink = status["uplink"]
    assert uplink["state"] == "offline"
    assert isinstance(uplink["since"], int | float)
    assert uplink["url"] == "" and uplink["connects"] == 0
    queue = status["queue"]
    assert "oldest_age" in queue
    assert [queue[k] for k in ("depth", "bytes", "dropped", "expired", "dead")] == [0] * 5

    accepted_seqs(agent.publish_many([{"op": "publish", "topic": "t", "data": "x" * 100}] * 3))
    queue = agent.queue()
    assert queue["depth"] == 3 and queue["bytes"] >= 300
    assert isinstance(queue["oldest_age"], int | float) and queue["oldest_age"] >= 0
    assert (queue["dropped"], queue["expired"], queue["dead"]) == (0, 0, 0)
    assert queue["dead_letters"] == []


def test_bad_requests_get_error_codes_and_the_connection_keeps_serving(
    agent_factory: AgentFactory,
) -> None:
    agent = agent_factory(None)
    bad: list[tuple[bytes, str]] = [
        (b"this is not json\n", "bad_json"),
        (b'{"op": "publish", "topic": \n', "bad_json"),
        (b"\xff\xfe\xfd\n", "bad_json"),
        (b"[1, 2, 3]\n", "bad_request"),
        (b'{"op": "frobnicate"}\n', "unknown_op"),
        (b'{"op": "publish", "data": "no topic"}\n', "bad_request"),
        (b'{"op": "publish", "topic": 5, "data": "x"}\n', "bad_request"),
        (b'{"op": "publish", "topic": "t", "data": 5}\n', "bad_request"),
        (b'{"op": "publish", "topic": "t", "data": "x", "prio": "high"}\n', "bad_request"),
        (b'{"op": "publish", "topic": "t", "data": "x", "ttl": "soon"}\n', "bad_request"),
        (b'{"op": "publish", "topic": "t", "data_b64": "***not base64***"}\n', "bad_request"),
    ]
    with agent.connect() as api:
        for line, code in bad:
            api.send_raw(line)
            assert_error(api.read_response(), code)
        # A 2 MiB line is refused without reading it into one buffer, and the
        # connection resynchronises at the next newline.
        api.send_raw(b'{"op": "publish", "topic": "t", "data": "' + b"a" * (2 * MiB) + b'"}\n')
        assert_error(api.read_response(), "too_long")
        good = api.request({"op": "publish", "topic": "sensors/t", "data": "still here"})
        assert accepted_seqs([good])
        assert api.request({"op": "status"})["ok"] is True

    assert agent.alive
    status = agent.status()
    assert status["queue"]["depth"] == 1


def test_message_over_the_size_limit_is_refused_with_too_large(
    agent_factory: AgentFactory,
) -> None:
    agent = agent_factory(None)
    with agent.connect() as api:
        # Over the default 1 MiB message limit, but under the line limit.
        line = json.dumps({"op": "publish", "topic": "t", "data": "x" * (MiB + 1)})
        api.send_raw(line.encode() + b"\n")
        assert_error(api.read_response(), "too_large")
        assert accepted_seqs([api.request({"op": "publish", "topic": "t", "data": "ok"})])
    assert agent.status()["queue"]["depth"] == 1


def test_many_connections_at_once_are_served(agent_factory: AgentFactory) -> None:
    agent = agent_factory(None)
    conns = [agent.connect() for _ in range(20)]
    try:
        for i, api in enumerate(conns):
            api.send_raw(
                json.dumps({"op": "publish", "topic": "t", "data": str(i)}).encode() + b"\n"
            )
        answers = [api.read_response() for api in conns]
    finally:
        for api in conns:
            api.close()
    assert all(a.get("ok") is True for a in answers), answers
    assert len(set(accepted_seqs(sorted(answers, key=lambda a: int(a["seq"]))))) == 20
    assert agent.status()["queue"]["depth"] == 20
