"""The registry's HTTP API (docs/registry.md, HTTP API) and the dashboard's two pages."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from edge.documents import parse_desired
from edge.errors import DocumentError, RegistryError
from edge.registry import dashboard
from edge.registry.desired import DesiredPublisher
from edge.registry.health import HEALTHS, HealthPolicy
from edge.registry.ingest import IngestStats
from edge.registry.settings import db_url_for_humans
from edge.registry.store import Store
from edge.registry.view import node_detail, node_summary

__all__ = ["Api", "make_app"]

_NODE = re.compile(r"[A-Za-z0-9_-]{1,64}")
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
                 max_body: int) -> None:
        self.store = store
        self.publisher = publisher
        self.stats = stats
        self.policy = policy
        self.db_url = db_url_for_humans(db_url)
        self.broker_online = broker_online
        self.max_body = max_body

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
            "nodes": await self.store.count(),
        })

    async def healthz(self, request: web.Request) -> web.Response:
        broker = "online" if self.broker_online() else "offline"
        try:
            await self.store.count()
        except RegistryError as exc:
            return web.json_response({"ok": False, "broker": broker, "db": self.db_url,
                                      "error": str(exc)}, status=503)
        return web.json_response({"ok": True, "broker": broker, "db": self.db_url,
                                  "signing_key": self.publisher.signing_kid})

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


def make_app(api: Api) -> web.Application:
    """The aiohttp application with every route."""
    app = web.Application(middlewares=[_errors], client_max_size=api.max_body)
    app.router.add_get("/api/v1/nodes", api.list_nodes)
    app.router.add_get("/api/v1/nodes/{node}", api.get_node)
    app.router.add_put("/api/v1/nodes/{node}/desired", api.put_desired)
    app.router.add_put("/api/v1/labels/{key}/{value}/desired", api.put_label_desired)
    app.router.add_get("/api/v1/stats", api.stats_view)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/", api.fleet_page)
    app.router.add_get("/nodes/{node}", api.node_page)
    return app
