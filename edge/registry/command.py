"""`edge registry serve` and `keygen`: argument parsing only; the server is imported when
it runs."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_registry_parser"]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_registry_parser(sub: Any) -> None:
    """Add `registry serve` to the `edge` command's subparsers."""
    registry = sub.add_parser("registry", help="the fleet registry server")
    registry_sub = registry.add_subparsers(dest="registry_command", required=True,
                                           metavar="SUBCOMMAND")
    serve = registry_sub.add_parser("serve", help="run the registry server")
    serve.add_argument("--broker", default="mqtt://127.0.0.1:1883", metavar="URL",
                       help="the fleet's MQTT broker (default mqtt://127.0.0.1:1883)")
    serve.add_argument("--db", metavar="URL",
                       help="sqlite:///PATH or postgresql://user:pass@host:port/db (default"
                            " sqlite:///var/lib/edge-registry/registry.db)")
    serve.add_argument("--http", default="127.0.0.1:8080", metavar="HOST:PORT",
                       help="where the HTTP API and dashboard listen (default 127.0.0.1:8080;"
                            " any other than a loopback address needs --api-token-file)")
    serve.add_argument("--api-token-file", type=Path, metavar="FILE",
                       help="every /api/v1 request and the dashboard need the token on the"
                            " first line of FILE (never on the command line):"
                            " Authorization: Bearer TOKEN")
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="a Host name (or NAME:PORT) the HTTP API answers besides the"
                            " --http address and localhost; repeatable (default none)")
    serve.add_argument("--insecure-no-token", action="store_true",
                       help="run a non-loopback --http without --api-token-file: anyone who"
                            " reaches the port can change every node's desired state")
    serve.add_argument("--prefix", default="edge/v1", help="topic prefix (default edge/v1)")
    serve.add_argument("--client-id", metavar="ID",
                       help="MQTT client id, unique per worker (default edge-registry-HOST-PID)")
    serve.add_argument("--share-group", default="edge-registry", metavar="NAME",
                       help="the shared subscription group: the workers of one registry use"
                            " the same one, another registry (staging, a second store) its"
                            " own (default edge-registry)")
    serve.add_argument("--stale-after", default="3", metavar="N",
                       help="an online node is stale after N heartbeats unheard (default 3)")
    serve.add_argument("--backlog-depth", default="10000", metavar="N",
                       help="an online node is backlogged over N queued messages"
                            " (default 10000)")
    serve.add_argument("--backlog-age", default="1h", metavar="DURATION",
                       help="... or with its oldest queued message older than this"
                            " (default 1h)")
    serve.add_argument("--reconnect-max", default="30s", metavar="DURATION",
                       help="longest wait between reconnects to the broker (default 30s)")
    serve.add_argument("--catchup-idle", default="1s", metavar="DURATION",
                       help="the retained read at each connection ends after this long"
                            " without a retained document (default 1s)")
    serve.add_argument("--catchup-max", default="60s", metavar="DURATION",
                       help="... and after this long in any case; raise it past about"
                            " 150,000 nodes (default 60s)")
    serve.add_argument("--ca-file", type=Path, metavar="FILE",
                       help="mqtts:// broker: the CA certificates to check it against"
                            " (default: the system's)")
    serve.add_argument("--cert-file", type=Path, metavar="FILE",
                       help="mqtts:// broker: the registry's own certificate (mutual TLS)")
    serve.add_argument("--key-file", type=Path, metavar="FILE",
                       help="its private key (default: inside --cert-file)")
    serve.add_argument("--username", default="", metavar="NAME",
                       help="MQTT user name (default none)")
    serve.add_argument("--password-file", type=Path, metavar="FILE",
                       help="MQTT password: the first line of FILE (never on the command line)")
    serve.add_argument("--signing-key", type=Path, metavar="FILE",
                       help="Ed25519 private key (PEM) that signs every desired document;"
                            " agents with [state] desired_keys accept only signed ones")
    serve.add_argument("--log-level", type=str.upper, choices=_LOG_LEVELS, metavar="LEVEL",
                       help="DEBUG, INFO, WARNING or ERROR (default INFO, or $EDGE_LOG_LEVEL)")
    serve.set_defaults(handler=_serve)
    keygen = registry_sub.add_parser(
        "keygen", help="make an Ed25519 key pair for --signing-key and [state] desired_keys")
    keygen.add_argument("--out", type=Path, required=True, metavar="FILE",
                        help="the private key (mode 0600) goes here, the public one to"
                             " FILE.pub; neither may exist")
    keygen.set_defaults(handler=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    from edge.signing import generate_key, public_key_text

    try:
        signer = generate_key(args.out)
    except OSError as exc:
        why = "exists; a key is never overwritten" if isinstance(exc, FileExistsError) \
            else exc.strerror or str(exc)
        print(f"edge registry keygen: {exc.filename or args.out}: {why}", file=sys.stderr)
        return 1
    print(f"private key: {args.out} (for edge registry serve --signing-key)\n"
          f"public key:  {args.out}.pub (for the nodes' [state] desired_keys)\n"
          f"key id:      {signer.kid}\n\n{public_key_text(signer.public_key)}", end="")
    return 0


def _fail(message: str) -> int:
    print(f"edge registry serve: {message}", file=sys.stderr)
    return 2


def _settings(args: argparse.Namespace) -> Any:
    """RegistrySettings from the flags; ValueError names the flag."""
    from edge.config import parse_mqtt_url
    from edge.registry.health import HealthPolicy
    from edge.registry.settings import (
        RegistrySettings,
        check_allow_host,
        check_prefix,
        check_share_group,
        default_db_url,
        parse_http,
        read_api_token,
    )
    from edge.registry.store import check_db_url
    from edge.units import parse_duration

    def flag(name: str, parse: Any, value: Any) -> Any:
        try:
            return parse(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name}: {exc}") from None

    def number(text: str) -> float:
        value = float(text)
        if not value > 0 or value == float("inf"):
            raise ValueError(f"expected a number above 0, got {text!r}")
        return value

    def count(text: str) -> int:
        if not text.isdigit():
            raise ValueError(f"expected a whole number from 0, got {text!r}")
        return int(text)

    def duration(text: str) -> float:
        value = parse_duration(text)
        if value <= 0:
            raise ValueError(f"expected a duration above 0 like 30s, got {text!r}")
        return value

    scheme, broker_host, broker_port = flag("--broker", parse_mqtt_url, args.broker)
    tls_flags = [name for name, value in (("--ca-file", args.ca_file),
                                          ("--cert-file", args.cert_file),
                                          ("--key-file", args.key_file)) if value]
    if tls_flags and scheme != "mqtts":
        raise ValueError(f"{tls_flags[0]}: needs an mqtts:// --broker, got {args.broker!r}")
    if args.key_file and not args.cert_file:
        raise ValueError("--key-file: needs --cert-file (the certificate this key belongs to)")
    if args.password_file and not args.username:
        raise ValueError("--password-file: needs --username")
    db_url = flag("--db", check_db_url, args.db or default_db_url())
    http_host, http_port = flag("--http", parse_http, args.http)
    prefix = flag("--prefix", check_prefix, args.prefix)
    client_id = args.client_id or f"edge-registry-{socket.gethostname()}-{os.getpid()}"[:64]
    if len(client_id) > 64 or "/" in client_id or not client_id.isprintable() \
            or " " in client_id:
        raise ValueError(f"--client-id: expected at most 64 characters without spaces or"
                         f" '/', got {client_id!r}")
    policy = HealthPolicy(
        stale_after=flag("--stale-after", number, args.stale_after),
        backlog_depth=flag("--backlog-depth", count, args.backlog_depth),
        backlog_age=flag("--backlog-age", duration, args.backlog_age),
    )
    reconnect_max = flag("--reconnect-max", duration, args.reconnect_max)
    share_group = flag("--share-group", check_share_group, args.share_group)
    if args.insecure_no_token and args.api_token_file:
        raise ValueError("--insecure-no-token: leave it out with --api-token-file")
    api_token = "" if args.api_token_file is None else flag(
        "--api-token-file", read_api_token, args.api_token_file)
    allow_hosts = tuple(flag("--allow-host", check_allow_host, name)
                        for name in args.allow_host)
    return RegistrySettings(
        share_group=share_group,
        broker_host=broker_host, broker_port=broker_port, db_url=db_url,
        http_host=http_host, http_port=http_port, prefix=prefix, client_id=client_id,
        health=policy, reconnect_max=max(reconnect_max, 0.2),
        catchup_idle=flag("--catchup-idle", duration, args.catchup_idle),
        catchup_max=flag("--catchup-max", duration, args.catchup_max),
        broker_tls=scheme == "mqtts", ca_file=args.ca_file, cert_file=args.cert_file,
        key_file=args.key_file, username=args.username, password_file=args.password_file,
        signing_key=args.signing_key, api_token=api_token, allow_hosts=allow_hosts,
        insecure_no_token=args.insecure_no_token,
    )


def _serve(args: argparse.Namespace) -> int:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return _fail("the registry needs its extra dependencies:"
                     " pip install 'edge-agent[registry]'")
    if (args.db or "").startswith(("postgresql:", "postgres:")):
        try:
            import asyncpg  # noqa: F401
        except ImportError:
            return _fail("--db postgresql:// needs asyncpg: pip install 'edge-agent[registry]'")
    try:
        settings = _settings(args)
    except ValueError as exc:
        return _fail(str(exc))

    from edge.logs import setup_logging
    from edge.registry.server import run_registry

    setup_logging(args.log_level)
    try:
        run_registry(settings)
    except KeyboardInterrupt:
        pass
    return 0
