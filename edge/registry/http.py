"""The registry's HTTP API (docs/registry.md, HTTP API) and the dashboard's two pages.

Every request passes `_guard` first (docs/registry.md, Access to the API): its
Host must be one of the registry's names (DNS rebinding), it must carry the
token when one is set, and a write must come with JSON from no foreign Origin.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from edge.documents import parse_desired
from edge.errors import DocumentError, RegistryError
from edge.registry import dashboard
from edge.registry.desired import DesiredPublisher
from edge.registry.health import HEALTHS, HealthPolicy
from edge.registry.ingest import IngestStats
from edge.registry.settings import db_url_for_humans
from edge.registry.store import Store
from edge.registry.view import node_detail, node_summary
from edge.rejections import Rejections

__all__ = ["Api", "make_app"]

log = logging.getLogger("edge.registry.http")

_NODE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_REFUSALS = ("bad_host", "unauthorized", "bad_origin", "unsupported_media_type")
_REALM = 'realm="edge registry"'
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An answer with an error body: {"error": {"code", "message"}}."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.code, str(exc))
    except RegistryError as exc:
        return _error(503, "db_unavailable", str(exc))
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "too_large", "request body over the limit")
    except web.HTTPException as exc:
        if request.path.startswith("/api/"):
            return _error(exc.status, exc.reason.lower().replace(" ", "_"),
                          f"{request.method} {request.path}: {exc.reason}")
        raise


def _node_of(request: web.Request) -> str:
    node = request.match_info["node"]
    if not _NODE.fullmatch(node):
        raise ApiError(400, "bad_node",
                       f"node: expected 1 to 64 characters A-Z a-z 0-9 _ -, got {node!r}")
    return node


class Api:
    """The handlers, over the store, the publisher and the ingest's counters."""

    def __init__(self, store: Store, publisher: DesiredPublisher, stats: IngestStats, *,
                 policy: HealthPolicy, db_url: str, broker_online: Callable[[], bool],
                 max_body: int, hosts: frozenset[str], token: str = "") -> None:
        self.store = store
        self.publisher = publisher
        self.stats = stats
        self.policy = policy
        self.db_url = db_url_for_humans(db_url)
        self.broker_online = broker_online
        self.max_body = max_body
        self.hosts = hosts
        self._token = token.encode()
        self.refused = Rejections(log, "HTTP request")

    # --- who may ask what ---------------------------------------------------------------

    def _token_in(self, request: web.Request, *, basic: bool) -> bool | None:
        """Whether the request has the token (None: it has no credentials at all)."""
        scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            given = value
        elif basic and scheme.lower() == "basic" and value:
            try:
                given = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        else:
            return None
        return hmac.compare_digest(given.encode("utf-8", "replace"), self._token)

    def authorized(self, request: web.Request) -> bool:
        """No token is set, or the request has it (Bearer, or Basic's password)."""
        return not self._token or self._token_in(request, basic=True) is True

    def _refuse(self, request: web.Request, status: int, code: str, message: str,
                headers: dict[str, str] | None = None) -> web.Response:
        path = request.path if len(request.path) <= 100 else request.path[:99] + "…"
        self.refused(code, f"{request.method} {path!r} from {request.remote or 'unknown'}:"
                           f" {message}")
        response = _error(status, code, message)
        response.headers.update(headers or {})
        return response

    def refusal(self, request: web.Request) -> web.Response | None:
        """The answer to a request that may not go on, None for one that may."""
        host = request.headers.get(hdrs.HOST, "").lower()
        if host not in self.hosts:
            name = _host_name(host)
            why = (f"Host {host[:100]!r}: not a name of this registry (its --http address,"
                   " localhost, or an --allow-host NAME)" if host else "no Host header")
            if name:
                why += f"; if its clients do call it {name}, start it with --allow-host {name}"
            return self._refuse(request, 421, "bad_host", why)
        api = request.path.startswith("/api/")
        if self._token and request.path != "/healthz":
            has = self._token_in(request, basic=not api)
            if has is not True:
                # A browser asks for Basic (the token as the password) on the dashboard only:
                # its cached credentials must never authorize a write another site starts.
                challenge = f"Bearer {_REALM}" if api else f"Basic {_REALM}, charset=\"UTF-8\""
                return self._refuse(
                    request, 401, "unauthorized",
                    ("the API token is wrong" if has is False else
                     "this registry needs its API token: Authorization: Bearer TOKEN (edge"
                     " fleet: --token-file FILE or $EDGE_REGISTRY_TOKEN_FILE)")
                    + ("" if api else "; in a browser, any user name and the token as the"
                                      " password"),
                    {hdrs.WWW_AUTHENTICATE: challenge})
        if request.method not in _SAFE_METHODS:
            origin = request.headers.get(hdrs.ORIGIN)
            if origin is not None and _origin_host(origin) not in self.hosts:
                return self._refuse(request, 403, "bad_origin",
                                    f"Origin {origin[:100]!r}: a write from another site")
            if request.content_type != "application/json":
                return self._refuse(
                    request, 415, "unsupported_media_type",
                    f"Content-Type {request.content_type[:100]!r}: expected"
                    " application/json")
        return None

    async def _summaries(self, request: web.Request) -> list[dict[str, Any]]:
        now = time.time()
        nodes = [node_summary(r, now=now, policy=self.policy) for r in await self.store.nodes()]
        health = request.query.get("health")
        if health is not None:
            if health not in HEALTHS:
                raise ApiError(400, "bad_request", f"health: expected one of"
                               f" {', '.join(HEALTHS)}, got {health!r}")
            nodes = [n for n in nodes if n["health"] == health]
        for label in request.query.getall("label", []):
            key, sep, value = label.partition("=")
            if not sep or not key:
                raise ApiError(400, "bad_request",
                               f"label: expected KEY=VALUE, got {label!r}")
            nodes = [n for n in nodes if n["labels"].get(key) == value]
        return nodes

    async def list_nodes(self, request: web.Request) -> web.Response:
        return web.json_response({"nodes": await self._summaries(request)})

    async def _detail(self, node: str) -> dict[str, Any] | None:
        row = await self.store.node(node) if _NODE.fullmatch(node) else None
        return None if row is None else node_detail(row, now=time.time(), policy=self.policy)

    async def get_node(self, request: web.Request) -> web.Response:
        node = _node_of(request)
        found = await self._detail(node)
        if found is None:
            raise ApiError(404, "unknown_node", f"no node {node!r} in the registry")
        return web.json_response(found)

    async def _desired_body(self, request: web.Request) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > self.max_body:
            raise ApiError(413, "too_large", f"desired document over {self.max_body} bytes")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, "too_large",
                           f"desired document over {self.max_body} bytes") from None
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "bad_json", f"body: not JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "bad_json", "body: nested too deeply") from None
        if not isinstance(doc, dict):
            raise ApiError(400, "invalid_desired",
                           f"desired: expected an object, got {type(doc).__name__}")
        if "version" in doc:
            raise ApiError(400, "invalid_desired",
                           "desired: version: set by the registry, leave it out")
        try:
            parse_desired(doc, need_version=False)
        except DocumentError as exc:
            raise ApiError(400, "invalid_desired", str(exc)) from None
        return doc

    def _by(self, request: web.Request) -> str:
        return f"registry ({request.remote or 'unknown'})"

    async def put_desired(self, request: web.Request) -> web.Response:
        node = _node_of(request)
        doc = await self._desired_body(request)
        provision = request.query.get("provision", "false")
        if provision not in ("true", "false"):
            raise ApiError(400, "bad_request", f"provision: expected true or false, got"
                                               f" {provision!r}")
        row = await self.store.node(node)
        heard = row is not None and (row["reported_version"] is not None
                                     or row["status_offline"] is not None)
        if not heard and provision != "true":
            # A typo must not make a fleet member; a node not yet installed is asked for.
            raise ApiError(404, "unknown_node", f"no node {node!r} has reported to the"
                           " registry; to set the desired state of a node before it first"
                           " connects, add ?provision=true")
        version, published = await self.publisher.put(node, doc, by=self._by(request))
        return web.json_response({"node": node, "version": version, "published": published})

    async def put_label_desired(self, request: web.Request) -> web.Response:
        key, value = request.match_info["key"], request.match_info["value"]
        doc = await self._desired_body(request)
        nodes = [r["node"] for r in await self.store.nodes()
                 if (json.loads(r["labels"] or "{}")).get(key) == value]
        if not nodes:
            raise ApiError(404, "no_nodes", f"no node has the label {key}={value}")
        out = []
        for node in nodes:
            version, published = await self.publisher.put(node, doc, by=self._by(request))
            out.append({"node": node, "version": version, "published": published})
        return web.json_response({"nodes": out})

    async def stats_view(self, request: web.Request) -> web.Response:
        counts = self.stats.rejections.counts
        return web.json_response({
            "documents": self.stats.documents,
            "rejected": {k: counts.get(k, 0) for k in ("invalid", "spoofed", "older")},
            "refused": {k: self.refused.counts.get(k, 0) for k in _REFUSALS},
            "nodes": await self.store.count(),
        })

    async def healthz(self, request: web.Request) -> web.Response:
        # Open to monitors without the token: then it leaves out where the database is.
        detail = self.authorized(request)
        broker = "online" if self.broker_online() else "offline"
        try:
            await self.store.count()
        except RegistryError as exc:
            failed: dict[str, Any] = {"ok": False, "broker": broker}
            failed.update({"db": self.db_url, "error": str(exc)} if detail
                          else {"error": "the database does not answer"})
            return web.json_response(failed, status=503)
        answer: dict[str, Any] = {"ok": True, "broker": broker}
        if detail:
            answer["db"] = self.db_url
        answer["signing_key"] = self.publisher.signing_kid
        return web.json_response(answer)

    async def fleet_page(self, request: web.Request) -> web.Response:
        health = request.query.get("health") or None
        if health is not None and health not in HEALTHS:
            health = None
        # The whole fleet: the page filters its rows itself and counts every health.
        page = dashboard.render_fleet(await self._summaries_all(), health=health,
                                      now=time.time())
        return web.Response(text=page, content_type="text/html")

    async def _summaries_all(self) -> list[dict[str, Any]]:
        now = time.time()
        return [node_summary(r, now=now, policy=self.policy) for r in await self.store.nodes()]

    async def node_page(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        found = await self._detail(node)
        if found is None:
            return web.Response(status=404, content_type="text/html",
                                text="<!doctype html><title>unknown node</title>"
                                     "<p>No such node in the registry. <a href=\"/\">Fleet</a>")
        return web.Response(text=dashboard.render_node(found, now=time.time()),
                            content_type="text/html")


def _host_name(host: str) -> str:
    """The Host header's name without the port, for a message ("" when there is none)."""
    name = host.rsplit(":", 1)[0] if re.search(r":[0-9]*$", host) else host
    return name if re.fullmatch(r"\[[0-9a-f:.]+\]|[a-z0-9.-]{1,253}", name) else ""


def _origin_host(origin: str) -> str:
    """HOST[:PORT] of an Origin header as a Host header has it ("" for "null" and junk)."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return ""
    return parts.netloc.lower() if parts.scheme in ("http", "https") else ""


def _guard(api: Api) -> Middleware:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = api.refusal(request)
        return refusal if refusal is not None else await handler(request)
    return guard


def make_app(api: Api) -> web.Application:
    """The aiohttp application with every route."""
    app = web.Application(middlewares=[_guard(api), _errors], client_max_size=api.max_body)
    app.router.add_get("/api/v1/nodes", api.list_nodes)
    app.router.add_get("/api/v1/nodes/{node}", api.get_node)
    app.router.add_put("/api/v1/nodes/{node}/desired", api.put_desired)
    app.router.add_put("/api/v1/labels/{key}/{value}/desired", api.put_label_desired)
    app.router.add_get("/api/v1/stats", api.stats_view)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/", api.fleet_page)
    app.router.add_get("/nodes/{node}", api.node_page)
    return app
