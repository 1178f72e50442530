"""The registry's dashboard: the fleet and one node as server-rendered HTML.

Pure functions from the HTTP API's objects (docs/registry.md) to a page; no
I/O, no scripts, no external resources (devices and dashboards may be
offline). Every value in a document came from a device, so every value is
escaped, and a missing or ill-typed field renders as "-" instead of raising.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlencode

from edge.humane import age as _age

__all__ = ["HEALTHS", "REFRESH_SECONDS", "render_fleet", "render_node"]

HEALTHS = ("offline", "stale", "online-backlogged", "healthy")
REFRESH_SECONDS = 5
_NUMERIC_COLUMNS = ("Queue", "Oldest backlog", "Services", "PID", "Restarts", "Last exit")

_CSS = """
:root { color-scheme: light; --fg: #1f2937; --muted: #6b7280; --line: #e5e7eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--fg); background: #f8fafc; }
header { background: #0f172a; color: #f8fafc; padding: 12px 24px; display: flex;
         align-items: baseline; gap: 16px; }
header h1 { font-size: 18px; margin: 0; font-weight: 600; }
header a { color: #cbd5e1; text-decoration: none; }
header .when { margin-left: auto; color: #94a3b8; font-size: 12px; }
main { padding: 16px 24px 32px; }
h2 { font-size: 15px; margin: 24px 0 8px; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line);
        border-radius: 6px; overflow: hidden; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { background: #f1f5f9; font-weight: 600; font-size: 12px; text-transform: uppercase;
     letter-spacing: .03em; color: #475569; }
tr:last-child td { border-bottom: none; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
a { color: #1d4ed8; }
.muted { color: var(--muted); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px;
         font-weight: 600; white-space: nowrap; border: 1px solid transparent; }
.health-healthy { background: #dcfce7; color: #166534; border-color: #86efac; }
.health-online-backlogged { background: #ffedd5; color: #9a3412; border-color: #fdba74; }
.health-stale { background: #fef3c7; color: #92400e; border-color: #fcd34d; }
.health-offline { background: #e5e7eb; color: #b91c1c; border-color: #d1d5db; }
.health-unknown { background: #f3f4f6; color: #374151; border-color: #d1d5db; }
.result-applied { color: #166534; }
.result-failed { color: #b91c1c; font-weight: 600; }
.result-removed { color: var(--muted); }
.state-running, .state-up { color: #166534; }
.state-crash-looping, .state-failed, .state-unhealthy { color: #b91c1c; font-weight: 600; }
.state-stopped, .state-lost { color: var(--muted); }
.filters { display: flex; flex-wrap: wrap; gap: 8px; margin: 0 0 12px; }
.filters a { text-decoration: none; padding: 4px 10px; border-radius: 6px; background: #fff;
             border: 1px solid var(--line); color: var(--fg); }
.filters a.current { border-color: #1d4ed8; box-shadow: inset 0 0 0 1px #1d4ed8; }
.filters .count { font-weight: 600; margin-left: 4px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0;
           background: #fff; border: 1px solid var(--line); border-radius: 6px;
           padding: 10px 14px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
.label { display: inline-block; background: #eef2ff; color: #3730a3; border-radius: 4px;
         padding: 0 6px; margin: 0 4px 2px 0; font-size: 12px; }
.side { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.side > section { min-width: 0; }
.rejected { background: #fef2f2; border: 1px solid #fecaca; color: #991b1b; border-radius: 6px;
            padding: 8px 12px; margin: 8px 0; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
            font-size: 12px; }
pre { margin: 0; white-space: pre-wrap; word-break: break-word; }
.empty { color: var(--muted); font-style: italic; padding: 8px 0; }
"""


def render_fleet(nodes: list[dict[str, Any]], *, health: str | None, now: float) -> str:
    """The fleet page: every node of `nodes` in `health` (None: all), with counts per health.

    `nodes` may be the whole fleet or already filtered; the counts are of `nodes`.
    """
    rows = [n for n in _list(nodes) if isinstance(n, dict)]
    wanted = health if isinstance(health, str) and health else None
    counts: dict[str, int] = {h: 0 for h in HEALTHS}
    for n in rows:
        h = _text(n.get("health"))
        counts[h] = counts.get(h, 0) + 1
    shown = [n for n in rows if wanted is None or n.get("health") == wanted]
    shown.sort(key=lambda n: _text(n.get("node")))

    links = [_filter_link("all", "/", len(rows), wanted is None)]
    for h, count in counts.items():
        links.append(_filter_link(h, "/?" + urlencode({"health": h}), count, wanted == h,
                                  css=_health_class(h)))
    if wanted is not None and wanted not in counts:
        links.append(_filter_link(wanted, "/?" + urlencode({"health": wanted}), 0, True))

    header = ("Node", "Health", "Last seen", "Queue", "Oldest backlog", "Services",
              "Profile", "Agent", "Desired")
    body = "".join(_fleet_row(n, now) for n in shown)
    if not shown:
        what = "no nodes" if wanted is None else f"no {_e(wanted)} nodes"
        body = f'<tr class="none"><td colspan="{len(header)}" class="empty">{what}</td></tr>'
    table = _table("nodes", header, body)
    refresh_to = "/" if wanted is None else "/?" + urlencode({"health": wanted})
    title = "Fleet" if wanted is None else f"Fleet: {wanted}"
    main = f'<nav class="filters" id="filters">{"".join(links)}</nav>{table}'
    return _page(title, main, now=now, refresh_to=refresh_to)


def render_node(node: dict[str, Any], *, now: float) -> str:
    """One node's page: facts, services, peers, and its desired next to its reported state."""
    n = node if isinstance(node, dict) else {}
    reported = _dict(n.get("reported"))
    desired = _dict(n.get("desired"))
    status = _dict(n.get("status"))
    node_id = _text(n.get("node")) or _text(reported.get("node")) or "?"

    main = (
        f'<h2>Node <span id="node-id">{_e(node_id)}</span> '
        f"{_health_badge(n.get('health'))}</h2>"
        + _facts(n, reported, status, now)
        + "<h2>Services</h2>" + _services_table(reported.get("services"))
        + "<h2>Peers</h2>" + _peers_table(reported.get("peers"), now)
        + "<h2>Desired and reported</h2>" + _desired_vs_reported(n, desired, reported, now)
    )
    path = "/nodes/" + quote(node_id, safe="")
    return _page(f"Node {node_id}", main, now=now, refresh_to=path)


# --- the page -------------------------------------------------------------------------------


def _page(title: str, main: str, *, now: float, refresh_to: str) -> str:
    when = _clock(now)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}; url={_e(refresh_to)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} · edge registry</title><style>{_CSS}</style></head>"
        '<body><header><h1><a href="/">edge registry</a></h1>'
        f'<span>{_e(title)}</span><span class="when">{_e(when)}'
        f" · reloads every {REFRESH_SECONDS}s</span></header>"
        f"<main>{main}</main></body></html>\n"
    )


def _filter_link(label: str, href: str, count: int, current: bool, css: str = "") -> str:
    classes = " ".join(c for c in ("current" if current else "", css) if c)
    attr = f' class="{classes}"' if classes else ""
    return (
        f'<a href="{_e(href)}"{attr} data-filter="{_e(label)}">{_e(label)}'
        f'<span class="count">{count}</span></a>'
    )


def _fleet_row(n: dict[str, Any], now: float) -> str:
    node_id = _text(n.get("node"))
    href = "/nodes/" + quote(node_id, safe="")
    queue = _int(n.get("queue_depth"))
    up, total = _int(n.get("services_up")), _int(n.get("services_total"))
    services = "-" if up is None and total is None else f"{_num(up)}/{_num(total)}"
    if services != "-" and n.get("online") is False:
        # What it last said, not what runs now.
        services = f'<span class="muted" title="as last reported">{services}</span>'
    cells = [
        f'<td class="node"><a href="{_e(href)}">{_e(node_id) or "?"}</a>{_labels(n.get("labels"))}'
        "</td>",
        f'<td class="health">{_health_badge(n.get("health"))}</td>',
        f'<td class="last-seen">{_ago(n.get("last_seen"), now)}</td>',
        f'<td class="num queue">{_num(queue)}</td>',
        f'<td class="num oldest">{_e(_age(_float(n.get("oldest_age"))))}</td>',
        f'<td class="num services">{services}</td>',
        f'<td class="profile">{_e(_text(n.get("profile")) or "-")}</td>',
        f'<td class="agent">{_e(_text(n.get("agent")) or "-")}</td>',
        f'<td class="desired">{_desired_summary(n)}</td>',
    ]
    health = _text(n.get("health"))
    return (f'<tr data-node="{_e(node_id)}" data-health="{_e(health)}">'
            + "".join(cells) + "</tr>")


def _desired_summary(n: dict[str, Any]) -> str:
    wanted, applied = _int(n.get("desired_version")), _int(n.get("desired_applied"))
    rejected = _dict(n.get("desired_rejected"))
    parts: list[str] = []
    if wanted:
        if applied is not None and applied >= wanted:
            parts.append(f'<span class="result-applied">v{wanted} applied</span>')
        else:
            parts.append(f"v{wanted} pending"
                         + (f' <span class="muted">(applied v{applied})</span>' if applied
                            else ""))
    elif applied:
        parts.append(f"v{applied} applied")
    failed = _int(n.get("desired_failed"))
    if failed and applied:
        parts.append(f'<span class="result-failed">{failed} failed</span>')
    if rejected:
        reason = _text(rejected.get("reason"))
        parts.append(f'<span class="result-failed" title="{_e(reason)}">rejected</span>')
    return " ".join(parts) or '<span class="muted">-</span>'


def _facts(n: dict[str, Any], reported: dict[str, Any], status: dict[str, Any],
           now: float) -> str:
    online = n.get("online")
    uplink = _dict(reported.get("uplink"))
    queue = _dict(reported.get("queue"))
    depth = _int(n.get("queue_depth"))
    if depth is None:
        depth = _int(queue.get("depth"))
    oldest = _float(n.get("oldest_age"))
    if oldest is None:
        oldest = _float(queue.get("oldest_age"))
    up, total = _int(n.get("services_up")), _int(n.get("services_total"))
    facts = [
        ("online", "-" if not isinstance(online, bool) else ("yes" if online else "no")),
        ("last seen", _ago(n.get("last_seen"), now)),
        ("status", _status_line(status, now)),
        ("labels", _labels(n.get("labels") if "labels" in n else reported.get("labels"))
         or '<span class="muted">none</span>'),
        ("profile", _e(_text(n.get("profile")) or _text(reported.get("profile")) or "-")),
        ("agent", _e(_text(n.get("agent")) or _text(reported.get("agent")) or "-")),
        ("queue", f"{_num(depth)} messages, oldest {_e(_age(oldest))}"
         + _queue_losses(queue)),
        ("uplink", _uplink_line(uplink, now)),
        ("services", "-" if up is None and total is None else f"{_num(up)} of {_num(total)} up"),
        ("reported", f"version {_num(_int(n.get('reported_version')))}"
         f", sent {_ago(reported.get('ts'), now)}"),
    ]
    return '<dl class="facts" id="facts">' + "".join(
        f'<dt>{k}</dt><dd data-fact="{_e(k)}">{v}</dd>' for k, v in facts) + "</dl>"


def _status_line(status: dict[str, Any], now: float) -> str:
    if not status:
        return '<span class="muted">no status yet</span>'
    parts = [_e(_text(status.get("state")) or "?")]
    ts = _float(status.get("ts"))
    if ts is not None:
        parts.append(f"last one {_ago(ts, now)}")
    boot = _float(status.get("boot"))
    if boot is not None:
        parts.append(f"agent started {_ago(boot, now)}")
    conn = _int(status.get("conn"))
    if conn is not None:
        parts.append(f"connection {conn}")
    heartbeat = _float(status.get("heartbeat"))
    if heartbeat is not None:
        parts.append(f"heartbeat every {_e(_age(heartbeat))}")
    return ", ".join(parts)


def _uplink_line(uplink: dict[str, Any], now: float) -> str:
    if not uplink:
        return "-"
    line = _e(_text(uplink.get("state")) or "?")
    since = _float(uplink.get("since"))
    if since is not None:
        line += f" for {_e(_age(now - since))}"
    connects = _int(uplink.get("connects"))
    if connects is not None:
        line += f", {connects} connects"
    error = _text(uplink.get("last_error"))
    if error:
        line += f' <span class="muted">(last error: {_e(error)})</span>'
    return line


def _queue_losses(queue: dict[str, Any]) -> str:
    losses = [(k, _int(queue.get(k))) for k in ("dropped", "expired", "dead")]
    shown = [f"{v} {k}" for k, v in losses if v]
    return f' <span class="muted">({", ".join(shown)})</span>' if shown else ""


def _services_table(services: Any) -> str:
    rows = [s for s in _list(services) if isinstance(s, dict)]
    if not rows:
        return '<p class="empty" id="services-empty">no services reported</p>'
    header = ("Name", "State", "Reason", "PID", "Restarts", "Last exit", "Source")
    body = ""
    for s in rows:
        name, state = _text(s.get("name")), _text(s.get("state"))
        body += (
            f'<tr data-service="{_e(name)}" data-state="{_e(state)}">'
            f'<td class="name">{_e(name) or "?"}</td>'
            f'<td class="state {_state_class(state)}">{_e(state) or "-"}</td>'
            f'<td class="reason">{_e(_text(s.get("reason")) or "-")}</td>'
            f'<td class="num">{_num(_int(s.get("pid")))}</td>'
            f'<td class="num">{_num(_int(s.get("restarts")))}</td>'
            f'<td class="num">{_num(_int(s.get("last_exit")))}</td>'
            f'<td>{_e(_text(s.get("source")) or "-")}</td></tr>'
        )
    return _table("services", header, body)


def _peers_table(peers: Any, now: float) -> str:
    rows = [p for p in _list(peers) if isinstance(p, dict)]
    if not rows:
        return '<p class="empty" id="peers-empty">no peers reported</p>'
    header = ("Node", "State", "Addresses", "Last seen")
    body = ""
    for p in rows:
        name, state = _text(p.get("node")), _text(p.get("state"))
        addresses = ", ".join(_text(a) for a in _list(p.get("addresses")) if _text(a))
        body += (
            f'<tr data-peer="{_e(name)}" data-state="{_e(state)}">'
            f'<td>{_e(name) or "?"}</td>'
            f'<td class="{_state_class(state)}">{_e(state) or "-"}</td>'
            f"<td>{_e(addresses) or '-'}</td>"
            f"<td>{_ago(p.get('last_seen'), now)}</td></tr>"
        )
    return _table("peers", header, body)


def _desired_vs_reported(n: dict[str, Any], desired: dict[str, Any], reported: dict[str, Any],
                         now: float) -> str:
    version = _int(desired.get("version")) or _int(n.get("desired_version"))
    applied = _int(reported.get("desired_applied"))
    if applied is None:
        applied = _int(n.get("desired_applied"))
    report = _dict(reported.get("desired"))
    results = _dict(report.get("items"))
    wanted = _desired_items(desired)

    if not desired:
        left = '<p class="empty">no desired state set</p>'
    else:
        by = _text(desired.get("by"))
        left = (f'<p id="desired-version">version {_num(version)},'
                f' set {_ago(desired.get("ts"), now)}'
                + (f" by {_e(by)}" if by else "") + "</p>")
        if n.get("desired_published") is False:
            left += ('<p class="result-failed" id="desired-unpublished">not published yet:'
                     " the registry publishes it when its broker is back</p>")
    if applied is None:
        right = '<p class="empty">nothing reported</p>'
    elif version and applied >= version:
        right = f'<p id="desired-applied" class="result-applied">applied version {applied}</p>'
    else:
        right = (f'<p id="desired-applied">applied version {applied or "none"}'
                 + (f"; version {version} not applied yet" if version else "") + "</p>")
    report_version = _int(report.get("version"))
    if report_version is not None and report_version != applied:
        right += f'<p class="muted">item results are for version {report_version}</p>'

    rejected = _dict(reported.get("desired_rejected")) or _dict(n.get("desired_rejected"))
    rejected_html = ""
    if rejected:
        rv = _int(rejected.get("version"))
        rejected_html = (
            f'<div class="rejected" id="desired-rejected">rejected'
            f'{f" version {rv}" if rv is not None else ""}'
            f' {_ago(rejected.get("ts"), now)}: '
            f'<span class="reason">{_e(_text(rejected.get("reason")) or "no reason given")}</span>'
            "</div>"
        )

    keys = list(wanted) + sorted(k for k in results if isinstance(k, str) and k not in wanted)
    if keys:
        body = ""
        for key in keys:
            result = _dict(results.get(key))
            outcome = _text(result.get("result"))
            cell = (f'<span class="{_result_class(outcome)}">{_e(outcome)}</span>' if outcome
                    else '<span class="muted">no result</span>')
            value = wanted.get(key, '<span class="muted">-</span>')
            body += (
                f'<tr data-item="{_e(key)}" data-result="{_e(outcome)}">'
                f'<td><code>{_e(key)}</code></td>'
                f"<td>{value}</td>"
                f"<td>{cell}</td>"
                f'<td class="reason">{_e(_text(result.get("reason")) or "")}</td></tr>'
            )
        result_head = "Result" + (f" (of v{report_version})" if report_version else "")
        items = _table("desired-items", ("Item", "Desired", result_head, "Reason"), body)
    else:
        items = '<p class="empty">no desired items</p>'
    return (
        '<div class="side"><section><h3>Desired</h3>' + left
        + '</section><section><h3>Reported</h3>' + right + "</section></div>"
        + rejected_html + items
    )


def _desired_items(desired: dict[str, Any]) -> dict[str, str]:
    """`services.NAME` / `config.SECTION.KEY` -> the desired value as escaped HTML."""
    items: dict[str, str] = {}
    for name, spec in _dict(desired.get("services")).items():
        items[f"services.{_text(name)}"] = f"<pre>{_e(_spec_text(spec))}</pre>"
    for section, body in _dict(desired.get("config")).items():
        for key, value in _dict(body).items():
            items[f"config.{_text(section)}.{_text(key)}"] = f"<code>{_e(_value(value))}</code>"
    return items


def _spec_text(spec: Any) -> str:
    if not isinstance(spec, dict):
        return _value(spec)
    return "\n".join(f"{_text(k)} = {_value(v)}" for k, v in spec.items())


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_text(k)} = {_value(v)}" for k, v in value.items()) + "}"
    return _text(value)


def _table(name: str, header: Iterable[str], body: str) -> str:
    return (f'<table id="{name}"><thead><tr>' + "".join(_th(h) for h in header)
            + f"</tr></thead><tbody>{body}</tbody></table>")


def _th(title: str) -> str:
    numeric = title in _NUMERIC_COLUMNS
    return f'<th class="num">{title}</th>' if numeric else f"<th>{title}</th>"


def _labels(labels: Any) -> str:
    pairs = sorted((_text(k), _text(v)) for k, v in _dict(labels).items())
    return "".join(f' <span class="label">{_e(k)}={_e(v)}</span>' for k, v in pairs)


def _health_badge(health: Any) -> str:
    text = _text(health) or "unknown"
    return f'<span class="badge {_health_class(text)}">{_e(text)}</span>'


def _health_class(health: str) -> str:
    return f"health-{health}" if health in HEALTHS else "health-unknown"


def _state_class(state: str) -> str:
    known = ("running", "up", "crash-looping", "failed", "unhealthy", "stopped", "lost")
    return f"state-{state}" if state in known else ""


def _result_class(result: str) -> str:
    return f"result-{result}" if result in ("applied", "failed", "removed") else ""


# --- values from documents: never trusted, never raising ------------------------------------


def _e(value: Any) -> str:
    return html.escape(_text(value), quote=True)


def _text(value: Any) -> str:
    """A value as text for display ("" for None); containers and odd types as their repr."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "-"
    try:
        return repr(value)
    except Exception:  # a repr that fails must not take the page down
        return "?"


def _dict(value: Any) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        return None
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


def _ago(ts: Any, now: float) -> str:
    when = _float(ts)
    if when is None or not math.isfinite(now):
        return '<span class="muted">never</span>' if ts is None else "-"
    return f'<span title="{when:.3f}">{_age(now - when)} ago</span>'


def _clock(now: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    except (OverflowError, OSError, ValueError):
        return ""
