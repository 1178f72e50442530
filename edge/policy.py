"""Lay a firmware profile's policy defaults under the settings the config leaves out.

Precedence, highest first: a desired document from the registry (applied
live, edge/reconcile.py), the config file and command-line flags, the
profile's `[policy]`, the built-in defaults of edge/settings.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from edge.humane import size
from edge.profiles import Policy
from edge.settings import Settings

__all__ = ["POLICY_KEYS", "defaults", "shown", "with_policy"]

# A profile's [policy] key -> the settings key ("section.key") it is a default for.
POLICY_KEYS = {
    "queue_max_bytes": "queue.max_bytes",
    "queue_commit_interval": "queue.commit_interval",
    "telemetry_interval": "telemetry.interval",
}


def defaults(policy: Policy, given: frozenset[str]) -> dict[str, tuple[Any, bool]]:
    """Each settings key the policy has a value for: (the value, whether it is used).

    It is used unless the config file or a flag set that key (`given`).
    """
    return {key: (getattr(policy, name), key not in given)
            for name, key in POLICY_KEYS.items() if getattr(policy, name) is not None}


def with_policy(settings: Settings, policy: Policy) -> tuple[Settings, dict[str, Any]]:
    """(settings with the policy's values where the file and flags set none, those values).

    The second item maps each settings key taken from the profile to its value.
    """
    taken = {key: value for key, (value, in_use) in defaults(policy, settings.given).items()
             if in_use}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in taken.items():
        section, field = key.split(".")
        sections.setdefault(section, {})[field] = value
    changed = {section: replace(getattr(settings, section), **fields)
               for section, fields in sections.items()}
    return replace(settings, **changed), taken


def shown(key: str, value: float) -> str:
    """A policy value as people write it in the config: `64.0MiB`, `0.2s`, `off`."""
    if key.endswith("max_bytes"):
        return size(int(value))
    return "off" if key == "telemetry.interval" and value == 0 else f"{value:g}s"
