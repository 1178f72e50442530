"""`edge fleet ...`: a client of the registry's HTTP API (standard library only).

A device has none of the registry's dependencies, so this talks HTTP with
urllib. The registry is `--registry URL`, else `$EDGE_REGISTRY`, else
`[fleet] registry` of the config file, else http://127.0.0.1:8080. A registry
with an API token gets it from the first line of `--token-file FILE`, else of
`$EDGE_REGISTRY_TOKEN_FILE`.
Exit codes: 0 ok, 1 the registry failed or is unreachable, 2 usage or a
request the registry refused (an invalid document, an unknown node).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tomllib
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from edge.humane import age as _age

__all__ = ["DEFAULT_REGISTRY", "add_fleet_parser"]

DEFAULT_REGISTRY = "http://127.0.0.1:8080"
# Where `edge` looks for its config; the same default as edge.config's, kept here so that
# `edge fleet` needs nothing of the agent's settings machinery.
_DEFAULT_CONFIG = Path("/etc/edge/agent.toml")
_HEALTHS = ("offline", "stale", "online-backlogged", "healthy")
_EXIT_OK, _EXIT_FAIL, _EXIT_USAGE = 0, 1, 2


class _Failed(Exception):
    """A fleet command cannot go on; `code` is its exit code, the text is for stderr."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def add_fleet_parser(sub: Any) -> None:
    """Add `fleet ls/show/desired` to the `edge` command's subparsers."""
    # SUPPRESS: an option given before the subcommand is not reset by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="URL", default=argparse.SUPPRESS,
                        help=f"the registry (default: $EDGE_REGISTRY, else [fleet] registry of"
                        f" the config file, else {DEFAULT_REGISTRY})")
    common.add_argument("--config", type=Path, metavar="FILE", default=argparse.SUPPRESS,
                        help=f"config file (default {_DEFAULT_CONFIG})")
    common.add_argument("--token-file", type=Path, metavar="FILE", default=argparse.SUPPRESS,
                        help="the registry's API token is the first line of FILE (default:"
                        " $EDGE_REGISTRY_TOKEN_FILE, else [fleet] token_file, else none)")
    common.add_argument("--timeout", type=_seconds, metavar="SECONDS", default=argparse.SUPPRESS,
                        help="give up when the registry does not answer within this"
                        " (default 10)")

    fleet = sub.add_parser("fleet", parents=[common], help="the fleet as the registry sees it")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="SUBCOMMAND")

    ls = fleet_sub.add_parser("ls", parents=[common], help="list the nodes and their health")
    ls.add_argument("--health", choices=_HEALTHS, help="only the nodes in this health")
    ls.add_argument("--label", type=_label, metavar="KEY=VALUE",
                    help="only the nodes with this label")
    ls.add_argument("--json", action="store_true", help="print JSON for scripts")
    ls.set_defaults(handler=_ls)

    show = fleet_sub.add_parser("show", parents=[common],
                                help="one node: services, peers, desired and reported state")
    show.add_argument("node")
    show.add_argument("--json", action="store_true", help="print JSON for scripts")
    show.set_defaults(handler=_show)

    desired = fleet_sub.add_parser(
        "desired", parents=[common],
        help="set the desired state of a node, or of every node with a label",
        usage="edge fleet desired [options] (NODE | --label KEY=VALUE) FILE",
    )
    desired.add_argument("node", nargs="?", metavar="NODE",
                         help="the node (leave out with --label)")
    desired.add_argument("file", metavar="FILE",
                         help='the desired document, JSON or TOML; "-" reads stdin')
    desired.add_argument("--label", type=_label, metavar="KEY=VALUE",
                         help="every node with this label")
    desired.add_argument("--provision", action="store_true",
                         help="NODE has not reported yet (being installed): set it anyway")
    desired.add_argument("--json", action="store_true", help="print the answer as JSON")
    desired.set_defaults(handler=_desired)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


# --- the commands ---------------------------------------------------------------------------


def _run(args: argparse.Namespace,
         command: Callable[[argparse.Namespace, _Registry], int]) -> int:
    try:
        return command(args, _Registry(_registry_url(args), getattr(args, "timeout", 10.0),
                                       _token(args)))
    except _Failed as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return exc.code


def _ls(args: argparse.Namespace) -> int:
    return _run(args, _ls_command)


def _show(args: argparse.Namespace) -> int:
    return _run(args, _show_command)


def _desired(args: argparse.Namespace) -> int:
    return _run(args, _desired_command)


def _ls_command(args: argparse.Namespace, registry: _Registry) -> int:
    query: dict[str, str] = {}
    if getattr(args, "health", None):
        query["health"] = args.health
    if getattr(args, "label", None):
        query["label"] = "=".join(args.label)
    path = "/api/v1/nodes" + (f"?{urlencode(query)}" if query else "")
    answer = registry.request("GET", path)
    nodes = answer.get("nodes") if isinstance(answer, dict) else None
    if not isinstance(nodes, list):
        raise _Failed(f"registry {registry.url}: {path}: expected {{\"nodes\": [...]}},"
                      f" got {_brief(answer)}", _EXIT_FAIL)
    if getattr(args, "json", False):
        _say(json.dumps(nodes, indent=2))
    else:
        _say(_nodes_table([n for n in nodes if isinstance(n, dict)], time.time()))
    return _EXIT_OK


def _show_command(args: argparse.Namespace, registry: _Registry) -> int:
    answer = registry.request("GET", f"/api/v1/nodes/{quote(args.node, safe='')}")
    if not isinstance(answer, dict):
        raise _Failed(f"registry {registry.url}: expected a node, got {_brief(answer)}",
                      _EXIT_FAIL)
    if args.json:
        _say(json.dumps(answer, indent=2))
    else:
        _say(_node_text(answer, time.time()))
    return _EXIT_OK


def _desired_command(args: argparse.Namespace, registry: _Registry) -> int:
    if (args.node is None) == (args.label is None):
        raise _Failed("fleet desired: give either NODE or --label KEY=VALUE, and FILE",
                      _EXIT_USAGE)
    document = _read_document(args.file)
    if args.label is not None:
        key, value = args.label
        path = f"/api/v1/labels/{quote(key, safe='')}/{quote(value, safe='')}/desired"
    else:
        path = f"/api/v1/nodes/{quote(args.node, safe='')}/desired" + (
            "?provision=true" if args.provision else "")
    answer = registry.request("PUT", path, document)
    if not isinstance(answer, dict):
        raise _Failed(f"registry {registry.url}: expected an answer object, got"
                      f" {_brief(answer)}", _EXIT_FAIL)
    if args.json:
        _say(json.dumps(answer, indent=2))
        return _EXIT_OK
    answers = answer.get("nodes") if args.label is not None else [answer]
    lines = [_set_line(a) for a in (answers if isinstance(answers, list) else [])
             if isinstance(a, dict)]
    _say("\n".join(lines) or "no nodes")
    return _EXIT_OK


def _set_line(answer: dict[str, Any]) -> str:
    node, version = _cell(answer.get("node")), _cell(answer.get("version"))
    if answer.get("published") is True:
        return f"{node}: desired version {version}, published"
    return (f"{node}: desired version {version}, stored; not published yet (the registry"
            " publishes it when its broker is back)")


# --- where the registry is, and talking to it -----------------------------------------------


def _registry_url(args: argparse.Namespace) -> str:
    url = getattr(args, "registry", None)
    source = "--registry"
    if not url and os.environ.get("EDGE_REGISTRY"):
        url, source = os.environ["EDGE_REGISTRY"], "EDGE_REGISTRY"
    if not url:
        config = getattr(args, "config", None)
        url = _configured_registry(config or _DEFAULT_CONFIG, must_exist=config is not None)
        source = f"[fleet] registry of {config or _DEFAULT_CONFIG}"
    if not url:
        return DEFAULT_REGISTRY
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Failed(f"{source}: expected a URL like {DEFAULT_REGISTRY}, got {url!r}",
                      _EXIT_USAGE)
    return url.rstrip("/")


def _token(args: argparse.Namespace) -> tuple[str, str] | None:
    """(token, where it came from) from --token-file or $EDGE_REGISTRY_TOKEN_FILE, or None."""
    path: Path | None = getattr(args, "token_file", None)
    source = "--token-file"
    if path is None and os.environ.get("EDGE_REGISTRY_TOKEN_FILE"):
        path, source = Path(os.environ["EDGE_REGISTRY_TOKEN_FILE"]), "EDGE_REGISTRY_TOKEN_FILE"
    if path is None:
        config = getattr(args, "config", None) or _DEFAULT_CONFIG
        configured = _configured_fleet(config, must_exist=False).get("token_file")
        if configured is not None and (not isinstance(configured, str) or not configured):
            raise _Failed(f"config {config}: [fleet] token_file: expected a path, got"
                          f" {configured!r}", _EXIT_USAGE)
        if configured:
            path, source = Path(configured), f"[fleet] token_file of {config}"
    if path is None:
        return None
    try:
        with path.open("rb") as f:
            first = f.readline(8192)
    except OSError as exc:
        raise _Failed(f"{source} {path}: cannot read: {exc.strerror or exc}",
                      _EXIT_USAGE) from exc
    try:
        token = first.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if not token or not token.isprintable() or " " in token:
        raise _Failed(f"{source} {path}: expected the registry's API token on the first line"
                      " (printable ASCII, no spaces)", _EXIT_USAGE)
    return token, f"{source} {path}"


def _configured_registry(path: Path, must_exist: bool) -> str | None:
    url = _configured_fleet(path, must_exist).get("registry")
    if url is not None and not isinstance(url, str):
        raise _Failed(f"config {path}: [fleet] registry: expected a URL like"
                      f" {DEFAULT_REGISTRY!r}, got {url!r}", _EXIT_USAGE)
    return url or None


def _configured_fleet(path: Path, must_exist: bool) -> dict[str, Any]:
    """The [fleet] table of the config file; {} when there is none (or it is root's only)."""
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        if must_exist:
            raise _Failed(f"config {path}: no such file", _EXIT_USAGE) from None
        return {}
    except PermissionError:
        if must_exist:
            raise _Failed(f"config {path}: permission denied", _EXIT_USAGE) from None
        return {}  # a config only root may read: the other defaults still apply
    except (OSError, UnicodeDecodeError) as exc:
        raise _Failed(f"config {path}: cannot read: {exc}", _EXIT_USAGE) from exc
    except tomllib.TOMLDecodeError as exc:
        raise _Failed(f"config {path}: not valid TOML: {exc}", _EXIT_USAGE) from exc
    fleet = document.get("fleet", {})
    if not isinstance(fleet, dict):
        raise _Failed(f"config {path}: [fleet]: expected a table", _EXIT_USAGE)
    return fleet


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Answer a redirect as the error it is: urllib would send the token along to its target."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> None:
        return None


class _Registry:
    """The registry's HTTP API: JSON in, JSON out, its errors as `_Failed`."""

    def __init__(self, url: str, timeout: float, token: tuple[str, str] | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self._token = token
        self._open = (urllib.request.urlopen if token is None
                      else urllib.request.build_opener(_NoRedirect).open)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if self._token is not None:
            req.add_header("Authorization", f"Bearer {self._token[0]}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with self._open(req, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise self._refused(exc, method, path) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Failed(f"registry {self.url} is unreachable: {reason}", _EXIT_FAIL) from exc
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _Failed(f"registry {self.url}: {method} {path}: the answer is not JSON:"
                          f" {_brief(raw)}", _EXIT_FAIL) from None

    def _refused(self, exc: urllib.error.HTTPError, method: str, path: str) -> _Failed:
        try:
            raw = exc.read()
        except OSError:
            raw = b""
        try:
            error = json.loads(raw)["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            code = message = ""
        if exc.code == 401:
            if self._token is None:
                return _Failed(f"registry {self.url} needs its API token: give the file it is"
                               " in (its first line) with --token-file FILE,"
                               " $EDGE_REGISTRY_TOKEN_FILE or [fleet] token_file",
                               _EXIT_USAGE)
            return _Failed(f"registry {self.url} refused the API token of {self._token[1]}:"
                           f" {_cell(message or 'unauthorized', 200)}; is it the registry's"
                           " --api-token-file?", _EXIT_USAGE)
        if not code:
            return _Failed(f"registry {self.url}: {method} {path}: HTTP {exc.code}"
                           f" {exc.reason}: {_brief(raw)}", _EXIT_FAIL)
        # A 4xx with the API's error object is our request the registry refused.
        if 400 <= exc.code < 500:
            return _Failed(f"registry: {code}: {message}", _EXIT_USAGE)
        return _Failed(f"registry {self.url}: {code}: {message}", _EXIT_FAIL)


# --- the desired document -------------------------------------------------------------------


def _read_document(name: str) -> dict[str, Any]:
    where = "stdin" if name == "-" else name
    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise _Failed(f"{where}: cannot read: {exc.strerror or exc}", _EXIT_USAGE) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Failed(f"{where}: not UTF-8 text: {exc}", _EXIT_USAGE) from exc
    suffix = Path(name).suffix.lower() if name != "-" else ""
    as_json = suffix == ".json" or (suffix != ".toml" and text.lstrip().startswith("{"))
    try:
        document: Any = json.loads(text) if as_json else tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        kind = "JSON" if as_json else "TOML"
        raise _Failed(f"{where}: not valid {kind}: {exc}", _EXIT_USAGE) from exc
    except RecursionError:
        kind = "JSON" if as_json else "TOML"
        raise _Failed(f"{where}: not valid {kind}: nested too deeply", _EXIT_USAGE) from None
    if not isinstance(document, dict):
        raise _Failed(f"{where}: expected an object like {{\"services\": {{...}}}},"
                      f" got {type(document).__name__}", _EXIT_USAGE)
    if not document:
        # A truncated file would stop every service the registry runs there.
        raise _Failed(f"{where}: the document is empty; to remove every service the registry"
                      ' manages, send {"services": {}} on purpose', _EXIT_USAGE)
    return document


# --- output ---------------------------------------------------------------------------------


def _nodes_table(nodes: list[dict[str, Any]], now: float) -> str:
    if not nodes:
        return "no nodes"
    header = ("NODE", "HEALTH", "LAST SEEN", "QUEUE", "OLDEST", "SERVICES", "PROFILE",
              "AGENT", "DESIRED")
    lines = [header] + [
        (
            _cell(n.get("node")), _cell(n.get("health")), _ago(n.get("last_seen"), now),
            _cell(n.get("queue_depth")), _age(_number(n.get("oldest_age"))),
            _services(n), _cell(n.get("profile")), _cell(n.get("agent")), _desired_cell(n),
        )
        for n in nodes
    ]
    counts: dict[str, int] = {}
    for n in nodes:
        health = _cell(n.get("health"))
        counts[health] = counts.get(health, 0) + 1
    order = [h for h in _HEALTHS if h in counts] + sorted(h for h in counts if h not in _HEALTHS)
    summary = (f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: "
               + ", ".join(f"{counts[h]} {h}" for h in order))
    return _table(lines) + "\n\n" + summary


def _node_text(n: dict[str, Any], now: float) -> str:
    reported = _dict(n.get("reported"))
    desired = _dict(n.get("desired"))
    labels = _dict(n.get("labels"))
    rows = [
        ("node", _cell(n.get("node"))),
        ("health", _cell(n.get("health"))),
        ("last seen", _ago(n.get("last_seen"), now)),
        ("profile", _cell(n.get("profile"))),
        ("agent", _cell(n.get("agent"))),
        ("labels", ", ".join(f"{_cell(k)}={_cell(v)}" for k, v in sorted(labels.items()))
         or "-"),
        ("queue", f"{_cell(n.get('queue_depth'))} messages, oldest"
                  f" {_age(_number(n.get('oldest_age')))}"),
        ("services", _services(n).replace("/", " of ", 1) + " up"
         if _services(n) != "-" else "-"),
        ("reported", f"version {_cell(n.get('reported_version'))}"),
        ("desired", _desired_cell(n)),
    ]
    rejected = n.get("desired_rejected")
    if isinstance(rejected, dict):
        rows.append(("rejected", f"version {_cell(rejected.get('version'))}:"
                                 f" {_cell(rejected.get('reason'), 200)}"))
    out = _pairs(rows)

    services = [s for s in _items(reported.get("services")) if isinstance(s, dict)]
    if services:
        out += "\n\nSERVICES\n" + _table([("NAME", "STATE", "PID", "RESTARTS", "SOURCE",
                                           "REASON")] + [
            (_cell(s.get("name")), _cell(s.get("state")), _cell(s.get("pid")),
             _cell(s.get("restarts")), _cell(s.get("source")), _cell(s.get("reason"), 60))
            for s in services])
    peers = [p for p in _items(reported.get("peers")) if isinstance(p, dict)]
    if peers:
        out += "\n\nPEERS\n" + _table([("NODE", "STATE", "ADDRESSES", "LAST SEEN")] + [
            (_cell(p.get("node")), _cell(p.get("state")),
             _cell(", ".join(str(a) for a in _items(p.get("addresses"))) or None, 60),
             _ago(p.get("last_seen"), now))
            for p in peers])
    report = _dict(reported.get("desired"))
    results = _dict(report.get("items"))
    config = _dict(desired.get("config"))
    wanted = [f"services.{k}" for k in _keys(desired.get("services"))] + [
        f"config.{section}.{key}" for section, body in config.items() for key in _keys(body)
    ]
    keys = wanted + sorted(str(k) for k in results if str(k) not in wanted)
    if keys:
        rows_ = [("ITEM", "RESULT", "REASON")]
        for key in keys:
            result = _dict(results.get(key))
            rows_.append((_cell(key), _cell(result.get("result") or "pending"),
                          _cell(result.get("reason"), 80)))
        out += "\n\nDESIRED ITEMS\n" + _table(rows_)
    return out


def _services(n: dict[str, Any]) -> str:
    up, total = n.get("services_up"), n.get("services_total")
    if up is None and total is None:
        return "-"
    # An offline node's figures are what it last said, not what runs now.
    return f"{_cell(up)}/{_cell(total)}" + (" (last report)" if n.get("online") is False
                                            else "")


def _desired_cell(n: dict[str, Any]) -> str:
    wanted, applied = n.get("desired_version"), n.get("desired_applied")
    wanted = wanted if isinstance(wanted, int) and not isinstance(wanted, bool) else None
    applied = applied if isinstance(applied, int) and not isinstance(applied, bool) else None
    if wanted:
        text = (f"v{wanted} applied" if applied is not None and applied >= wanted
                else f"v{wanted} pending" + (f" (applied v{applied})" if applied else ""))
    else:
        text = f"v{applied} applied" if applied else "-"
    failed = n.get("desired_failed")
    if isinstance(failed, int) and not isinstance(failed, bool) and failed > 0 and applied:
        text += f", {failed} failed"
    if n.get("desired_published") is False and wanted:
        text += ", not published yet"
    if isinstance(n.get("desired_rejected"), dict):
        text += ", rejected"
    return text


def _dict(value: Any) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _keys(value: Any) -> list[str]:
    return [str(k) for k in value] if isinstance(value, dict) else []


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _ago(ts: Any, now: float) -> str:
    when = _number(ts)
    return "never" if when is None else f"{_age(now - when)} ago"


def _cell(value: Any, width: int = 40) -> str:
    """A value from a device as one safe table cell: controls escaped, length capped."""
    text = "-" if value is None or value == "" else str(value)
    safe = "".join(
        ch if unicodedata.category(ch)[0] != "C" else ch.encode("unicode_escape").decode()
        for ch in text
    )
    return safe if len(safe) <= width else safe[: width - 1] + "…"


def _table(lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _pairs(pairs: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def _brief(value: Any) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else repr(value)
    return _cell(text.strip() or "(empty)", 120)


def _say(text: str) -> None:
    print(text)
    sys.stdout.flush()
