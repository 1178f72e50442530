"""The `edge` command: runs the agent and talks to it over the socket API."""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from edge.client import ApiClient
from edge.config import DEFAULT_CONFIG, default_socket_path, load_settings
from edge.errors import AgentNotRunning, ConfigError, EdgeError
from edge.humane import age as _age
from edge.humane import size as _size
from edge.policy import shown

__all__ = ["main"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_AGENT = 0, 1, 2, 3

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Content types whose payload is text; with any other --ct, stdin is sent as bytes.
_TEXT_TYPES = ("application/json", "application/xml")


class _OutputFailed(EdgeError):
    """Standard output could not be written (a full disk, a closed terminal)."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def _log_lines(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 200:
        raise argparse.ArgumentTypeError(f"expected a number of lines from 1 to 200, got {text!r}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge", description="Store-and-forward agent for edge devices."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--socket", type=Path, help="the agent's socket (default: from config)")
        c.add_argument("--config", type=Path, help=f"config file (default {DEFAULT_CONFIG})")
        c.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                       help="give up when the agent does not answer within this (default 10)")
        return c

    run = sub.add_parser("run", help="run the agent in the foreground")
    run.add_argument("--config", type=Path, help=f"config file (default {DEFAULT_CONFIG})")
    run.add_argument("--uplink", metavar="URL", help="cloud broker, e.g. mqtt://host:1883")
    run.add_argument("--data-dir", metavar="DIR", help="where the outbox lives")
    run.add_argument("--node-id", metavar="ID", help="this node's id")
    run.add_argument("--log-level", type=str.upper, choices=_LOG_LEVELS, metavar="LEVEL",
                     help="DEBUG, INFO, WARNING or ERROR (default INFO, or $EDGE_LOG_LEVEL)")

    for name, what in (
        ("status", "show the agent's state"),
        ("queue", "show the outbox"),
        ("peers", "show the agents found on the LAN"),
    ):
        c = client(name, what)
        c.add_argument("--json", action="store_true", help="print JSON for scripts")

    svc = client("services", "show the supervised services, or restart one")
    svc.add_argument("action", nargs="?", choices=["restart"], help="restart NAME")
    svc.add_argument("name", nargs="?", help="the service to restart")
    svc.add_argument("--json", action="store_true", help="print JSON for scripts")
    logs = client("logs", "show the last lines a service printed")
    logs.add_argument("name")
    logs.add_argument("-n", "--lines", type=_log_lines, default=50, help="how many (1 to 200)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="then print new lines as they come, until interrupted")
    listen = client("subscribe", "print down messages for a topic filter as they arrive")
    listen.add_argument("filter", help='an MQTT topic filter, e.g. "cmd/#"')
    listen.add_argument("--json", action="store_true", help="print one JSON object a line")

    pub = client("publish", "queue one message (answers once it is stored)")
    pub.add_argument("topic")
    pub.add_argument(
        "data", nargs="?",
        help="the payload; - reads it from stdin, as does leaving it out when stdin is"
        " not a terminal",
    )
    pub.add_argument(
        "--ct",
        help="content type (default text/plain, or application/octet-stream for a payload"
        " that is not UTF-8). With a --ct other than text/*, application/json, */*+json or"
        " application/xml the payload is sent as bytes",
    )
    pub.add_argument("--prio", type=int, default=0, help="priority, higher first")
    pub.add_argument("--ttl", type=float, help="seconds before it expires unsent")
    pub.add_argument("--json", action="store_true", help="print the answer as JSON")

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = cfg_sub.add_parser("check", help="validate a config file")
    check.add_argument("file", type=Path)

    from edge.fleet import add_fleet_parser
    from edge.install import add_install_parsers
    from edge.profile_cli import add_profile_parser
    from edge.registry.command import add_registry_parser

    add_registry_parser(sub)  # `edge registry serve`: its imports wait until it runs
    add_fleet_parser(sub)     # `edge fleet ...`: a client of the registry's HTTP API
    add_install_parsers(sub)  # `edge install` / `edge uninstall`: the systemd service
    add_profile_parser(sub)   # `edge profile`: reads the board's files, no agent needed
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edge` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "config":
            return _config_check(args.file)
        if args.command in ("registry", "fleet", "profile", "install", "uninstall"):
            code: int = args.handler(args)
            return code
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
        _discard_stdout()
        return EXIT_OK


def _discard_stdout() -> None:
    """Point stdout at /dev/null so that the flush at exit does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _say(text: object, accepted: int | None = None) -> None:
    """Print `text` to stdout now; a failed write is an EdgeError naming what was done."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        _discard_stdout()
        done = "" if accepted is None else f" (the message was accepted as seq {accepted})"
        raise _OutputFailed(f"cannot write output: {exc.strerror or exc}{done}") from exc


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
    # What `edge run` checks at start besides the file: the keys load, the group exists.
    from edge.api import group_id
    from edge.signing import configured_keyring

    configured_keyring(settings.state.desired_keys, settings.source)
    try:
        group_id(settings.api.group)
    except ConfigError as exc:
        raise ConfigError(f"config {settings.source}: {exc}") from exc
    _say(f"{path}: ok (node {settings.node.id}, uplink {settings.uplink.url or 'none'})")
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
    request: dict[str, Any] | None = {"op": args.command}
    if args.command == "services" and args.action == "restart":
        if not args.name:
            print("edge: give the NAME of the service to restart", file=sys.stderr)
            return EXIT_USAGE
        request = {"op": "service.restart", "name": args.name}
    elif args.command == "logs":
        request = {"op": "service.logs", "name": args.name, "lines": args.lines}
        if args.follow:
            request["follow"] = True
            return _follow(args, request, _print_log_line)
    elif args.command == "subscribe":
        request = {"op": "subscribe", "filter": args.filter}
        return _follow(args, request, partial(_print_message, as_json=args.json))
    if args.command == "publish":
        # Read the payload before connecting: stdin may take its time.
        request = _publish_request(args)
    if request is None:
        print("edge: give DATA, or - to read it from stdin", file=sys.stderr)
        return EXIT_USAGE
    with ApiClient(_socket_path(args), timeout=args.timeout) as api:
        answer = api.request(request)
    if not answer.get("ok"):
        return _fail(answer)
    if args.command == "publish":
        _say(json.dumps(answer) if args.json else answer["seq"], accepted=answer["seq"])
    elif args.command == "services":
        if args.action == "restart":
            _say(f"restarted {answer['name']}")
        else:
            rows = answer["services"]
            _say(json.dumps(rows, indent=2) if args.json else _services_table(rows))
    elif args.command == "logs":
        for line in answer["lines"]:
            _say(line)
    elif args.command == "peers":
        if args.json:
            _say(json.dumps(answer["peers"], indent=2))
        else:
            _say(_peers_table(answer["peers"], answer.get("discovery") or {}))
    elif args.json:
        _say(json.dumps(answer, indent=2))
    elif args.command == "status":
        _say(_status_table(answer))
    else:
        _say(_queue_table(answer))
    return EXIT_OK


def _follow(
    args: argparse.Namespace, request: dict[str, Any], show: Callable[[dict[str, Any]], None]
) -> int:
    """Print a streaming answer's lines until the agent ends the stream or we are stopped."""
    with ApiClient(_socket_path(args), timeout=args.timeout) as api:
        lines = api.stream(request)
        answer = next(lines)
        if not answer.get("ok"):
            return _fail(answer)
        for line in answer.get("lines", []):
            _say(line)
        for item in lines:
            show(item)
    print("edge: the agent ended the stream", file=sys.stderr)
    return EXIT_FAIL


def _print_log_line(item: dict[str, Any]) -> None:
    if item.get("event") == "log":
        _say(item.get("line", ""))


def _print_message(item: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        _say(json.dumps(item))
    elif item.get("event") == "dropped":
        print(f"edge: {item.get('count')} message(s) lost: read too slowly", file=sys.stderr)
    elif item.get("event") == "message":
        if "data" in item:
            _say(f"{item['topic']} {item['data']}")
        else:
            _say(f"{item['topic']} base64:{item.get('data_b64', '')}")


def _publish_request(args: argparse.Namespace) -> dict[str, Any] | None:
    """Build the publish request, or None when DATA is missing and stdin is a terminal."""
    req: dict[str, Any] = {"op": "publish", "topic": args.topic, "prio": args.prio}
    if args.data is None and (sys.stdin is None or sys.stdin.isatty()):
        return None
    if args.data is None or args.data == "-":
        raw = sys.stdin.buffer.read()
    else:
        raw = os.fsencode(args.data)  # the argument's bytes as they came in
    if args.ct and not _is_text_type(args.ct):
        # Declared binary: bytes that happen to be valid UTF-8 must not arrive as text.
        req["data_b64"] = base64.b64encode(raw).decode()
    else:
        try:
            req["data"] = raw.decode()
        except UnicodeDecodeError:
            req["data_b64"] = base64.b64encode(raw).decode()
    if args.ct:
        req["ct"] = args.ct
    if args.ttl is not None:
        req["ttl"] = args.ttl
    return req


def _is_text_type(ct: str) -> bool:
    media = ct.split(";", 1)[0].strip().lower()
    return media.startswith("text/") or media.endswith("+json") or media in _TEXT_TYPES


def _fail(answer: dict[str, Any]) -> int:
    err = answer.get("error") or {}
    code, message = err.get("code", "error"), err.get("message", answer)
    if code == "too_long":
        limit = re.search(r"(\d+) bytes", str(message))
        per_line = f"max {limit[1]} bytes per request line; " if limit else ""
        print(
            f"edge: the payload is too large for the socket API ({per_line}"
            "see [queue] max_message_bytes)",
            file=sys.stderr,
        )
    else:
        print(f"edge: {code}: {message}", file=sys.stderr)
    # A request the agent calls malformed is a usage error, like a bad flag.
    return EXIT_USAGE if code in ("bad_request", "unknown_service") else EXIT_FAIL


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _rows(pairs: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def _status_table(s: dict[str, Any]) -> str:
    up, q = s["uplink"], s["queue"]
    since = _age(time.time() - up["since"]) if up.get("since") else "-"
    uplink = f"{up['state']} for {since}"
    if up.get("url"):
        uplink += f" ({up['url']}, {_count(up.get('connects', 0), 'connect')})"
    rows = [("node", s["node"]), ("uplink", uplink)]
    if s.get("profile"):
        taken = s.get("profile_policy") or {}
        defaults = ", ".join(f"{key} {shown(key, value)}" for key, value in taken.items())
        line = s["profile"] + (f" (its defaults: {defaults})" if defaults else "")
        rows.append(("profile", line))
    if up.get("last_error") and up["state"] != "online":
        rows.append(("last error", up["last_error"]))
    if q.get("storage_error"):
        since = q.get("storage_error_since")
        failing = f" for {_age(time.time() - since)}" if since else ""
        rows.append(("storage", f"FAILING{failing}: {q['storage_error']}"))
    if s.get("clock", {}).get("synchronised") is False:
        rows.append(("clock", "not synchronised yet: messages are marked (tsu) until it is"))
    if q.get("moved_aside"):
        moved = q["moved_aside"]
        ago = f" {_age(time.time() - moved['ts'])} ago" if moved.get("ts") else ""
        rows.append(("moved aside", f"the outbox was corrupt: moved to {moved['path']}{ago}"
                                    " and a fresh one started"))
    rows += [
        ("queue", f"{_count(q['depth'], 'message')}, {_size(q['bytes'])},"
                  f" oldest {_age(q['oldest_age'])}"),
        ("rate", f"{q.get('rate_in', 0):.1f}/s in, {q.get('rate_out', 0):.1f}/s out"),
        ("lost", f"{q['dropped']} dropped, {q['expired']} expired,"
                 f" {_count(q['dead'], 'dead letter')}"),
    ]
    telemetry = s.get("telemetry")
    if telemetry is not None:
        interval = telemetry.get("interval") or 0
        rows.append(("telemetry", "off" if not interval else
                     f"every {_age(interval)}, {_count(telemetry.get('samples', 0), 'sample')}"))
    services = s.get("services")
    if services:
        trouble = sum(n for state, n in services.items() if state != "running")
        line = ", ".join(f"{n} {state}" for state, n in sorted(services.items()))
        rows.append(("services", line + ("  (edge services: why)" if trouble else "")))
    local, down = s.get("local"), s.get("down")
    if local is not None:
        line = local["state"]
        if local["state"] != "disabled":
            ago = _age(time.time() - local["since"]) if local.get("since") else "-"
            line += f" for {ago} ({local['url']}); {local['forwarded']} forwarded"
            if local.get("held"):
                line += f", {local['held']} held (outbox full)"
            rejected = sum(local.get("rejected", {}).values())
            if rejected:
                line += f", {rejected} rejected"
        rows.append(("local bus", line))
        if local.get("last_error") and local["state"] == "offline":
            rows.append(("local error", local["last_error"]))
    if down is not None:
        rejected = sum(down.get("rejected", {}).values())
        rows.append(("down", f"{down['received']} received, {down['delivered']} delivered,"
                             f" {down['pending']} waiting, {rejected} rejected,"
                             f" {down['expired']} expired"))
    desired = s.get("desired")
    if desired is not None:
        failed = [key for key, item in (desired.get("items") or {}).items()
                  if item.get("result") == "failed"]
        line = (f"version {desired['version']} applied" if desired.get("version")
                else "none received")
        if failed:
            line += f", {len(failed)} failed: {', '.join(failed)}"
        rows.append(("desired", line))
        rejected = desired.get("rejected")
        if rejected:
            which = ("a desired document" if rejected.get("version") is None
                     else f"desired version {rejected['version']}")
            rows.append(("rejected", f"{which}:"
                                     f" {rejected.get('reason')}"))
    d, peers = s.get("discovery"), s.get("peers")
    if d is not None:
        line = d["state"]
        if d["state"] == "running":
            line += f" as {d['instance']} on {', '.join(d['interfaces'])}"
            if peers is not None:
                line += f"; peers {peers['up']} up, {peers['lost']} lost"
        elif d.get("reason"):
            line += f": {d['reason']}"
        rows.append(("discovery", line))
        if d.get("conflict"):
            c = d["conflict"]
            rows.append(("name conflict", f"{c['wanted']!r} is taken on the LAN;"
                                          f" advertising as {c['instance']!r}"))
    return _rows(rows)


def _services_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no services configured ([services.NAME] in the config file)"
    header = ("NAME", "FROM", "STATE", "PID", "RESTARTS", "LAST EXIT", "UPTIME", "HEALTH",
              "REASON")
    lines = [header] + [
        (
            r["name"], r.get("source", "config"), r["state"], str(r.get("pid") or "-"),
            str(r.get("restarts", 0)),
            "-" if r.get("last_exit") is None else str(r["last_exit"]),
            _age(r.get("uptime")), r.get("health") or "-", _shown(r.get("reason") or "-", 60),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
    # Why a service is down is in its last lines: show them for the ones in trouble.
    for r in rows:
        if r["state"] in ("crash-looping", "failed", "unhealthy") and r.get("log_tail"):
            table += f"\n\n{r['name']}, last lines:\n" + "\n".join(
                f"  {_shown(line, 200)}" for line in r["log_tail"][-5:])
    return table


def _shown(text: str, width: int = 40) -> str:
    """A value from the LAN as one safe table cell: controls escaped, length capped."""
    safe = "".join(
        ch if unicodedata.category(ch)[0] != "C" else ch.encode("unicode_escape").decode()
        for ch in text
    )
    return safe if len(safe) <= width else safe[: width - 1] + "…"


def _peers_table(peers: list[dict[str, Any]], discovery: dict[str, Any]) -> str:
    state = discovery.get("state")
    if not peers:
        if state in ("disabled", "idle", "failed"):
            return f"no peers: discovery is {state} ({discovery.get('reason')})"
        return "no peers found"
    now = time.time()
    header = ("NODE", "STATE", "ADDRESSES", "UPLINK", "LAST SEEN")
    lines = [header] + [
        (
            _shown(p["node"] if p["node"] == p["instance"] else f"{p['node']} ({p['instance']})"),
            p["state"],
            _shown(", ".join(p["addresses"]) or "-", 60),
            p.get("uplink") or "-",
            f"{_age(now - p['last_seen'])} ago",
        )
        for p in peers
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1]
        for line in lines
    )


def _queue_table(q: dict[str, Any]) -> str:
    rows = [
        ("depth", str(q["depth"])),
        ("bytes", f"{_size(q['bytes'])} of {_size(q['max_bytes'])} ({q['on_full']} when full)"),
        ("oldest", _age(q["oldest_age"])),
        ("default ttl", "none (messages do not expire)" if not q.get("default_ttl")
         else _age(q["default_ttl"])),
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
