"""The reconciler's diff: from the services that run to the ones a desired document wants.

A plain function, no I/O. Services of the node's own config file are fixed:
the registry cannot replace or remove them. A desired service that cannot be
applied (its name is taken by the config file, a dependency is missing, its
account does not exist) fails on its own; an earlier version of it keeps
running when it can, and the rest of the document applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edge.errors import ConfigError
from edge.services import ServiceSpec, check_dependencies

__all__ = ["Plan", "plan_services"]


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
