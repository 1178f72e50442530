"""The `edge` command: runs the agent and talks to it over the socket API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge.client import ApiClient
from edge.config import DEFAULT_CONFIG, default_socket_path, load_settings
from edge.errors import AgentNotRunning, ConfigError, EdgeError

__all__ = ["main"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_AGENT = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge", description="Store-and-forward agent for edge devices."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--socket", type=Path, help="the agent's socket (default: from config)")
        c.add_argument("--config", type=Path, help=f"config file (default {DEFAULT_CONFIG})")
        return c

    run = sub.add_parser("run", help="run the agent in the foreground")
    run.add_argument("--config", type=Path, help=f"config file (default {DEFAULT_CONFIG})")
    run.add_argument("--uplink", metavar="URL", help="cloud broker, e.g. mqtt://host:1883")
    run.add_argument("--data-dir", metavar="DIR", help="where the outbox lives")
    run.add_argument("--node-id", metavar="ID", help="this node's id")
    run.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR")

    for name, what in (("status", "show the agent's state"), ("queue", "show the outbox")):
        c = client(name, what)
        c.add_argument("--json", action="store_true", help="print JSON for scripts")

    pub = client("publish", "queue one message (answers once it is stored)")
    pub.add_argument("topic")
    pub.add_argument("data", nargs="?", default="-", help="the payload, or - for stdin")
    pub.add_argument("--ct", help="content type (default text/plain)")
    pub.add_argument("--prio", type=int, default=0, help="priority, higher first")
    pub.add_argument("--ttl", type=float, help="seconds before it expires unsent")
    pub.add_argument("--json", action="store_true", help="print the answer as JSON")

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = cfg_sub.add_parser("check", help="validate a config file")
    check.add_argument("file", type=Path)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edge` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "config":
            return _config_check(args.file)
        return _client_command(args)
    except ConfigError as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AgentNotRunning as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return EXIT_NO_AGENT
    except EdgeError as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL
    except BrokenPipeError:
        # The reader went away (`edge status | head`): not our failure.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from edge.agent import run_agent
    from edge.logs import setup_logging

    settings = load_settings(
        args.config or DEFAULT_CONFIG, uplink=args.uplink, data_dir=args.data_dir,
        node_id=args.node_id, must_exist=args.config is not None,
    )
    setup_logging(args.log_level)
    run_agent(settings)
    return EXIT_OK


def _config_check(path: Path) -> int:
    settings = load_settings(path, must_exist=True)
    print(f"{path}: ok (node {settings.node.id}, uplink {settings.uplink.url or 'none'})")
    return EXIT_OK


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    if os.environ.get("EDGE_SOCKET"):
        return Path(os.environ["EDGE_SOCKET"])
    config = args.config or DEFAULT_CONFIG
    if args.config is not None or config.exists():
        return load_settings(config, must_exist=True).api.socket
    return default_socket_path()


def _client_command(args: argparse.Namespace) -> int:
    with ApiClient(_socket_path(args)) as api:
        if args.command == "publish":
            return _publish(api, args)
        answer = api.request({"op": args.command})
    if not answer.get("ok"):
        return _fail(answer)
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.command == "status":
        print(_status_table(answer))
    else:
        print(_queue_table(answer))
    return EXIT_OK


def _publish(api: ApiClient, args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"op": "publish", "topic": args.topic, "prio": args.prio}
    if args.data == "-":
        raw = sys.stdin.buffer.read()
        try:
            req["data"] = raw.decode()
        except UnicodeDecodeError:
            import base64

            req["data_b64"] = base64.b64encode(raw).decode()
    else:
        req["data"] = args.data
    if args.ct:
        req["ct"] = args.ct
    if args.ttl is not None:
        req["ttl"] = args.ttl
    answer = api.request(req)
    if not answer.get("ok"):
        return _fail(answer)
    print(json.dumps(answer) if args.json else answer["seq"])
    return EXIT_OK


def _fail(answer: dict[str, Any]) -> int:
    err = answer.get("error") or {}
    print(f"edge: {err.get('code', 'error')}: {err.get('message', answer)}", file=sys.stderr)
    return EXIT_FAIL


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


def _rows(pairs: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def _status_table(s: dict[str, Any]) -> str:
    up, q = s["uplink"], s["queue"]
    since = _age(time.time() - up["since"]) if up.get("since") else "-"
    uplink = f"{up['state']} for {since}"
    if up.get("url"):
        uplink += f" ({up['url']}, {up.get('connects', 0)} connects)"
    rows = [("node", s["node"]), ("uplink", uplink)]
    if up.get("last_error") and up["state"] != "online":
        rows.append(("last error", up["last_error"]))
    rows += [
        ("queue", f"{q['depth']} messages, {_size(q['bytes'])}, oldest {_age(q['oldest_age'])}"),
        ("rate", f"{q.get('rate_in', 0):.1f}/s in, {q.get('rate_out', 0):.1f}/s out"),
        ("lost", f"{q['dropped']} dropped, {q['expired']} expired, {q['dead']} dead letters"),
    ]
    return _rows(rows)


def _queue_table(q: dict[str, Any]) -> str:
    rows = [
        ("depth", str(q["depth"])),
        ("bytes", f"{_size(q['bytes'])} of {_size(q['max_bytes'])} ({q['on_full']} when full)"),
        ("oldest", _age(q["oldest_age"])),
        ("by priority", ", ".join(f"{p}: {n}" for p, n in q["by_priority"].items()) or "-"),
        ("rate", f"{q.get('rate_in', 0):.1f}/s in, {q.get('rate_out', 0):.1f}/s out"),
        ("dropped", str(q["dropped"])),
        ("expired", str(q["expired"])),
        ("dead letters", str(q["dead"])),
    ]
    out = _rows(rows)
    if q["dead_letters"]:
        out += "\n\nDEAD LETTERS\nSEQ        TOPIC                          REASON"
        for d in q["dead_letters"]:
            out += f"\n{d['seq']:<10} {d['topic'][:30]:<30} {d['reason']}"
    return out
