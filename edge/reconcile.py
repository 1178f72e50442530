"""The reconciler: make the node what a desired document says.

`plan_services` is the diff, a plain function with no I/O. `Reconciler` acts
on it: services through the supervisor, the live config keys on the telemetry
and the outbox. Services of the node's own config file are fixed:
the registry cannot replace or remove them. A desired service that cannot be
applied (its name is taken by the config file, a dependency is missing, its
account does not exist) fails on its own; an earlier version of it keeps
running when it can, and the rest of the document applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge.errors import ConfigError
from edge.services import ServiceError, ServiceSpec, check_dependencies

if TYPE_CHECKING:
    from edge.documents import Desired
    from edge.outbox import Outbox
    from edge.settings import Settings
    from edge.supervisor import Supervisor
    from edge.telemetry import Telemetry

__all__ = ["Plan", "Reconciler", "plan_services"]

# "services.NAME" / "config.SECTION.KEY" -> {"result": ..., "reason": ...}
Items = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Plan:
    """What to do to the desired-state services."""

    start: Mapping[str, ServiceSpec] = field(default_factory=dict)    # new ones
    replace: Mapping[str, ServiceSpec] = field(default_factory=dict)  # restart with this spec
    remove: tuple[str, ...] = ()                                      # stop and forget
    unchanged: tuple[str, ...] = ()
    failed: Mapping[str, str] = field(default_factory=dict)           # name -> why not
    kept: tuple[str, ...] = ()     # failed, but the version that ran before goes on


def plan_services(
    fixed: Mapping[str, ServiceSpec],
    current: Mapping[str, ServiceSpec],
    wanted: Mapping[str, ServiceSpec],
    refused: Mapping[str, str] | None = None,
) -> Plan:
    """Plan the move from `current` (desired services running now) to `wanted`.

    `fixed` are the config file's services; `refused` names wanted services
    already known not to work here, with the reason.
    """
    failed: dict[str, str] = dict(refused or {})
    for name in wanted:
        if name in fixed:
            failed[name] = "a service of this name is defined in the node's config file"
    chosen = {name: spec for name, spec in wanted.items() if name not in failed}
    kept = {name: current[name] for name in failed if name in current}
    while True:  # drop what depends on something that will not be there, until none does
        known = set(fixed) | set(chosen) | set(kept)
        broken = {
            name: [dep for dep in spec.depends_on if dep not in known]
            for name, spec in {**chosen, **kept}.items()
        }
        broken = {name: deps for name, deps in broken.items() if deps}
        if not broken:
            break
        for name, deps in broken.items():
            reason = f"depends on {', '.join(deps)}, which is not a service on this node"
            if name in chosen:
                del chosen[name]
                failed[name] = reason
                if name in current:
                    kept[name] = current[name]
            else:
                del kept[name]
                failed[name] = reason
    try:
        check_dependencies({**fixed, **chosen, **kept}, "desired")
    except ConfigError as exc:  # a cycle among the new ones: the running set had none
        for name in chosen:
            failed[name] = str(exc).removeprefix("config desired: ")
        kept.update({name: current[name] for name in chosen if name in current})
        chosen = {}
    final = {**chosen, **kept}
    return Plan(
        start={name: spec for name, spec in chosen.items() if name not in current},
        replace={name: spec for name, spec in chosen.items()
                 if name in current and current[name] != spec},
        remove=tuple(name for name in current if name not in final),
        unchanged=tuple(name for name, spec in final.items()
                        if name in current and current[name] == spec),
        failed=failed,
        kept=tuple(name for name in kept if name in final),
    )


class Reconciler:
    """Apply desired documents: services, then the config keys the registry may set."""

    def __init__(self, settings: Settings, supervisor: Supervisor, telemetry: Telemetry,
                 outbox: Outbox) -> None:
        # The config's values, with profile defaults: what a key left out goes back to.
        self._own = settings
        self._supervisor = supervisor
        self._telemetry = telemetry
        self._outbox = outbox
        self._config_set: set[str] = set()  # config keys the last document set

    async def apply(self, desired: Desired) -> Items:
        """Reconcile with `desired`; one item per service and config key it touched."""
        items: Items = {}
        try:
            results = await self._supervisor.apply(desired.services)
        except ServiceError as exc:  # the agent is stopping
            results = {name: ("failed", str(exc)) for name in desired.services}
        for name, (result, reason) in results.items():
            items[f"services.{name}"] = {"result": result, "reason": reason}
        config, own = desired.config, self._own
        self._telemetry.set_interval(own.telemetry.interval if config.telemetry_interval is None
                                     else config.telemetry_interval)
        self._outbox.set_policy(
            on_full=config.queue_on_full or own.queue.on_full,
            max_bytes=config.queue_max_bytes or own.queue.max_bytes,
            default_ttl=(own.queue.default_ttl if config.queue_default_ttl is None
                         else config.queue_default_ttl),
        )
        given = set(config.items())
        for key in given:
            items[f"config.{key}"] = {"result": "applied", "reason": None}
        for key in self._config_set - given:
            items[f"config.{key}"] = {"result": "removed",
                                      "reason": "back to the config file's value"
                                                " (or the firmware profile's default)"}
        self._config_set = given
        return items

    def live_items(self, items: Items) -> Items:
        """`items` as they stand now: a service applied but not running counts failed."""
        states = {row["name"]: row for row in self._supervisor.snapshot()}
        now: Items = {}
        for key, item in items.items():
            row = states.get(key.removeprefix("services.")) if key.startswith("services.") \
                else None
            if item["result"] == "applied" and row is not None \
                    and row["state"] in ("failed", "crash-looping"):
                item = {"result": "failed",
                        "reason": f"applied, but {row['state']}: {row['reason'] or '-'}"}
            now[key] = item
        return now
