"""Firmware profiles: recognise the board and read its facts from files under a root.

A profile is data (`firmware-profiles/NAME.toml`, see docs/profiles.md); this module
loads and validates the files, picks the profile that matches a machine
(`detect`) and reads the facts the profile names (`read_facts`). Everything
takes a root directory, so the tests run against fixture trees of real boards.

Where the files live: in the checkout they are `firmware-profiles/` at the top
of the repository (DESIGN.md's layout), which is also where an editable install
finds them (the package is this checkout's `edge/`). A wheel installs them as
data files into `{sys.prefix}/share/edge-agent/firmware-profiles/`
(pyproject's `[tool.setuptools.data-files]`). A package directory inside
`edge/` or a symlink to one would move the files away from the layout or break
on systems that copy trees without links, so the two places are searched in
that order instead.

Facts: every fact is a small map, `{"value": V, "source": PATH}` when it was
read and `{"value": None, "reason": TEXT}` when it is missing or unreadable.
Reading never raises for a board that lacks a file; each file read is bounded.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import ProfileError
from edge.units import parse_duration, parse_size

__all__ = [
    "AUTO",
    "Policy",
    "Profile",
    "check_profile_name",
    "decode_revision",
    "decode_throttled",
    "detect",
    "facts_for",
    "facts_of",
    "load_profiles",
    "profile_dirs",
    "read_facts",
    "resolve",
    "select",
]

AUTO = "auto"
UNKNOWN = "unknown"

# Bounds on what one read may take: sysfs and device-tree files are a few bytes;
# /proc/cpuinfo grows with the core count (about 1 KiB a core on x86), and the
# Raspberry Pi's Revision line comes after every core's block.
_READ_MAX = 4096
_CPUINFO_MAX = 64 * 1024
_MAX_ZONES = 64
_MAX_PATTERN_HITS = 16

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_GENERIC = "generic-"

_TOP_KEYS = {"description", "match", "facts", "policy"}
_MATCH_KEYS = {"machine", "model", "compatible", "revision_types"}
_CLUE_KEYS = ("model", "compatible", "revision_types")
_POLICY_KEYS = {"queue_max_bytes", "telemetry_interval", "queue_commit_interval"}

Fact = dict[str, Any]


@dataclass(frozen=True)
class Policy:
    """Defaults a profile suggests for settings the config file leaves out."""

    queue_max_bytes: int | None = None
    telemetry_interval: float | None = None   # seconds; 0 = off
    queue_commit_interval: float | None = None  # seconds a commit waits to gather more


@dataclass(frozen=True)
class Profile:
    """One board family: how to recognise it, what to read, and its policy defaults."""

    name: str
    description: str
    machines: tuple[str, ...]
    models: tuple[str, ...] = ()
    compatibles: tuple[str, ...] = ()
    revision_types: tuple[int, ...] = ()
    facts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    policy: Policy = Policy()
    source: str = ""

    @property
    def generic(self) -> bool:
        """True for the generic-* profiles, which match by architecture alone."""
        return self.name.startswith(_GENERIC)


# -- where profiles live -------------------------------------------------------


def profile_dirs() -> tuple[Path, ...]:
    """The directories searched for profiles, in order (see the module docstring)."""
    checkout = Path(__file__).resolve().parent.parent / "firmware-profiles"
    installed = Path(sys.prefix) / "share" / "edge-agent" / "firmware-profiles"
    return checkout, installed


def _default_dir() -> Path:
    for directory in profile_dirs():
        if directory.is_dir():
            return directory
    searched = ", ".join(str(d) for d in profile_dirs())
    raise ProfileError(f"no firmware-profiles directory found (searched {searched})")


# -- loading and validation ----------------------------------------------------


def load_profiles(directory: Path | None = None) -> dict[str, Profile]:
    """Load and validate every `NAME.toml` in `directory` (default: the shipped ones)."""
    directory = _default_dir() if directory is None else directory
    try:
        paths = sorted(directory.glob("*.toml"))
    except OSError as exc:
        raise ProfileError(f"firmware profiles {directory}: cannot list: {exc}") from exc
    if not paths:
        raise ProfileError(f"firmware profiles {directory}: no *.toml files")
    return {profile.name: profile for profile in map(_load_one, paths)}


def _load_one(path: Path) -> Profile:
    where = f"firmware profile {path}"
    name = path.stem
    if not _NAME.fullmatch(name):
        raise ProfileError(f"{where}: the file name must be a profile name like"
                           f' "generic-arm64.toml" (lower case, digits, "-", "_", ".")')
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ProfileError(f"{where}: cannot read: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{where}: not valid TOML: {' '.join(str(exc).split())}") from exc
    try:
        return _build(name, document, str(path))
    except ValueError as exc:
        raise ProfileError(f"{where}: {exc}") from exc


def _build(name: str, doc: dict[str, Any], source: str) -> Profile:
    """The Profile a parsed document describes; ValueError("KEY: expected ...") if not."""
    _known(doc, _TOP_KEYS, "")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"description: expected a string, got {description!r}")
    match = _table(doc, "match")
    _known(match, _MATCH_KEYS, "[match] ")
    machines = _strings(match, "machine", "[match] ")
    if not machines:
        raise ValueError('[match] machine: expected a non-empty list like ["aarch64"]')
    types = match.get("revision_types", [])
    if not isinstance(types, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= 0xFF for t in types
    ):
        raise ValueError(f"[match] revision_types: expected a list of board type numbers"
                         f" from 0x00 to 0xff, got {types!r}")
    profile = Profile(
        name=name,
        description=description,
        machines=machines,
        models=_strings(match, "model", "[match] "),
        compatibles=_strings(match, "compatible", "[match] "),
        revision_types=tuple(types),
        facts=_facts(_table(doc, "facts")),
        policy=_policy(_table(doc, "policy")),
        source=source,
    )
    clues = any(match.get(key) for key in _CLUE_KEYS)
    if profile.generic and clues:
        raise ValueError("[match]: a generic-* profile matches by machine alone; move"
                         " model, compatible and revision_types to a board profile")
    if not profile.generic and not clues:
        raise ValueError("[match]: expected at least one of model, compatible or"
                         " revision_types (only generic-* profiles match by machine alone)")
    return profile


def _known(table: Mapping[str, Any], keys: set[str], where: str) -> None:
    for key in table:
        if key not in keys:
            raise ValueError(f"{where}{key}: unknown key (known: {', '.join(sorted(keys))})")


def _table(doc: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"[{key}]: expected a table, got {value!r}")
    return value


def _strings(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}{key}: expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def _facts(table: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    facts: dict[str, tuple[str, ...]] = {}
    for key, paths in table.items():
        if key not in _READERS:
            known = ", ".join(sorted(_READERS))
            raise ValueError(f"[facts] {key}: unknown fact (known: {known})")
        if (not isinstance(paths, list) or not paths or not all(
                isinstance(p, str) and p.startswith("/") and ".." not in p.split("/")
                and "\0" not in p for p in paths)):
            raise ValueError(f'[facts] {key}: expected a non-empty list of absolute paths like'
                             f' ["/proc/meminfo"] (read under the root; no ".."), got {paths!r}')
        facts[key] = tuple(paths)
    return facts


def _policy(table: Mapping[str, Any]) -> Policy:
    _known(table, _POLICY_KEYS, "[policy] ")
    checks: dict[str, tuple[Callable[[Any], Any], str, Callable[[float], bool]]] = {
        "queue_max_bytes": (parse_size, 'a size above 0 like "256MiB"', lambda v: v > 0),
        "telemetry_interval": (parse_duration, '"0s" (off) or a duration of at least 1s',
                               lambda v: v == 0 or v >= 1),
        "queue_commit_interval": (parse_duration, "a duration from 0s to 1s",
                                  lambda v: 0 <= v <= 1),
    }
    values: dict[str, Any] = {}
    for key, raw in table.items():
        parse, expected, ok = checks[key]
        try:
            value = parse(raw)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise ValueError(f"[policy] {key}: expected {expected}, got {raw!r}")
        values[key] = value
    return Policy(**values)


def check_profile_name(name: str, directory: Path | None = None) -> str:
    """Return `name` if it is "auto" or a known profile, else raise ValueError listing them."""
    if name == AUTO:
        return name
    known = load_profiles(directory)
    if name not in known:
        raise ValueError(f'expected "auto" or a known firmware profile'
                         f" ({', '.join(sorted(known))}), got {name!r}")
    return name


# -- bounded reads -------------------------------------------------------------


def _under(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _read_bytes(path: Path, limit: int = _READ_MAX) -> bytes:
    with path.open("rb") as file:
        return file.read(limit)


def _expand(root: Path, pattern: str) -> list[Path]:
    """The files a profile path names under `root`: itself, or a glob's first few hits."""
    if not any(c in pattern for c in "*?["):
        return [_under(root, pattern)]
    try:
        return sorted(root.glob(pattern.lstrip("/")))[:_MAX_PATTERN_HITS]
    except OSError:
        return []


def _first(root: Path, paths: Iterable[str], limit: int = _READ_MAX,
           ) -> tuple[bytes, str] | str:
    """(content, the path it came from) of the first readable file, else why none was."""
    reasons: list[str] = []
    for pattern in paths:
        candidates = _expand(root, pattern)
        if not candidates:
            reasons.append(f"{pattern}: no such file")
        for path in candidates:
            shown = "/" + str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
            try:
                return _read_bytes(path, limit), shown
            except FileNotFoundError:
                reasons.append(f"{shown}: no such file")
            except OSError as exc:
                reasons.append(f"{shown}: {exc.strerror or exc}")
    return "; ".join(reasons) or "no path given"


def _text(data: bytes) -> str:
    # Device-tree strings end in NUL; sysfs values end in a newline.
    return data.decode("utf-8", "replace").rstrip("\0").strip()


def _cpuinfo(root: Path) -> dict[str, str]:
    """The last value of each `Key : value` line of /proc/cpuinfo (empty when unreadable)."""
    try:
        data = _read_bytes(_under(root, "/proc/cpuinfo"), _CPUINFO_MAX)
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
            if key.strip() in ("Hardware", "Revision", "Model", "Serial"):
                fields[key.strip()] = value.strip()
    return fields


def _dt_text(root: Path, name: str) -> str | None:
    got = _first(root, (f"/proc/device-tree/{name}", f"/sys/firmware/devicetree/base/{name}"))
    return None if isinstance(got, str) else got[0].decode("utf-8", "replace")


# -- decoders ------------------------------------------------------------------

# Raspberry Pi new-style revision codes: NOQu uuWu FMMM CCCC PPPP TTTT TTTT RRRR.
_BOARD_TYPES = {
    0x00: "A", 0x01: "B", 0x02: "A+", 0x03: "B+", 0x04: "2B", 0x05: "Alpha", 0x06: "CM1",
    0x08: "3B", 0x09: "Zero", 0x0A: "CM3", 0x0C: "Zero W", 0x0D: "3B+", 0x0E: "3A+",
    0x0F: "Internal use", 0x10: "CM3+", 0x11: "4B", 0x12: "Zero 2 W", 0x13: "400",
    0x14: "CM4", 0x15: "CM4S", 0x16: "Internal use", 0x17: "5", 0x18: "CM5", 0x19: "500",
    0x1A: "CM5 Lite",
}
_PROCESSORS = {0: "BCM2835", 1: "BCM2836", 2: "BCM2837", 3: "BCM2711", 4: "BCM2712"}
_MAKERS = {0: "Sony UK", 1: "Egoman", 2: "Embest", 3: "Sony Japan", 4: "Embest", 5: "Stadium"}
_NEW_STYLE = 1 << 23


def decode_revision(code: int) -> dict[str, Any]:
    """Decode a new-style Raspberry Pi revision code; ValueError for an old-style one."""
    if not code & _NEW_STYLE:
        raise ValueError(f"{code:x} is an old-style revision code (Pi 1 era), not decoded")
    kind = (code >> 4) & 0xFF
    memory_mib = 256 << ((code >> 20) & 0x7)
    processor = (code >> 12) & 0xF
    maker = (code >> 16) & 0xF
    return {
        "code": f"{code:x}",
        "type": _BOARD_TYPES.get(kind, f"unknown type 0x{kind:02x}"),
        "type_code": kind,
        "revision": f"1.{code & 0xF}",
        "memory_mib": memory_mib,
        "processor": _PROCESSORS.get(processor, f"unknown processor {processor}"),
        "manufacturer": _MAKERS.get(maker, f"unknown manufacturer {maker}"),
        "warranty_void": bool(code & (1 << 25)),
    }


_THROTTLED_BITS = {
    0: "under_voltage", 1: "arm_freq_capped", 2: "throttled", 3: "soft_temp_limit",
    16: "under_voltage_occurred", 17: "arm_freq_capped_occurred",
    18: "throttled_occurred", 19: "soft_temp_limit_occurred",
}


def decode_throttled(value: int) -> dict[str, Any]:
    """The Pi firmware's get_throttled bits as named flags ("now" bits 0-3, "occurred" 16-19)."""
    flags: dict[str, Any] = {"raw": f"0x{value:x}"}
    flags.update({name: bool(value >> bit & 1) for bit, name in _THROTTLED_BITS.items()})
    return flags


# -- facts ---------------------------------------------------------------------


def _found(value: Any, source: str) -> Fact:
    return {"value": value, "source": source}


def _missing(reason: str) -> Fact:
    return {"value": None, "reason": reason}


def _fact_text(root: Path, paths: tuple[str, ...]) -> Fact:
    got = _first(root, paths)
    if isinstance(got, str):
        return _missing(got)
    text = _text(got[0])
    return _found(text, got[1]) if text else _missing(f"{got[1]}: empty")


def _fact_compatible(root: Path, paths: tuple[str, ...]) -> Fact:
    got = _first(root, paths)
    if isinstance(got, str):
        return _missing(got)
    items = [s for s in got[0].decode("utf-8", "replace").split("\0") if s]
    return _found(items, got[1]) if items else _missing(f"{got[1]}: empty")


def _be32(data: bytes) -> int | None:
    return int.from_bytes(data[:4], "big") if len(data) >= 4 else None


def _fact_board(root: Path, paths: tuple[str, ...]) -> Fact:
    reasons: list[str] = []
    for path in paths:
        if path == "/proc/cpuinfo":
            raw = _cpuinfo(root).get("Revision")
            code = int(raw, 16) if raw and re.fullmatch(r"[0-9a-fA-F]{1,8}", raw) else None
            if code is None:
                reasons.append(f"{path}: no Revision line" if raw is None
                               else f"{path}: Revision {raw!r} is not hexadecimal")
        else:  # a device-tree cell: the revision as one big-endian 32-bit number
            got = _first(root, (path,))
            if isinstance(got, str):
                reasons.append(got)
                continue
            code = _be32(got[0])
            if code is None:
                reasons.append(f"{path}: expected 4 bytes, got {len(got[0])}")
        if code is not None:
            try:
                return _found(decode_revision(code), path)
            except ValueError as exc:
                return _missing(f"{path}: {exc}")
    return _missing("; ".join(reasons))


def _fact_memory(root: Path, paths: tuple[str, ...]) -> Fact:
    got = _first(root, paths)
    if isinstance(got, str):
        return _missing(got)
    match = re.search(rb"^MemTotal:\s+(\d+) kB", got[0], re.MULTILINE)
    if not match:
        return _missing(f"{got[1]}: no MemTotal line")
    return _found({"total_bytes": int(match[1]) * 1024}, got[1])


def _fact_temperatures(root: Path, paths: tuple[str, ...]) -> Fact:
    reasons: list[str] = []
    for path in paths:
        base = _under(root, path)
        try:
            zones = sorted(p for p in base.iterdir() if p.name.startswith("thermal_zone"))
        except FileNotFoundError:
            reasons.append(f"{path}: no such directory")
            continue
        except OSError as exc:
            reasons.append(f"{path}: {exc.strerror or exc}")
            continue
        if not zones:
            reasons.append(f"{path}: no thermal zones")
            continue
        readings = [_zone(zone, f"{path}/{zone.name}") for zone in zones[:_MAX_ZONES]]
        return _found(readings, path)
    return _missing("; ".join(reasons))


def _zone(zone: Path, shown: str) -> dict[str, Any]:
    reading: dict[str, Any] = {"zone": zone.name, "type": None, "celsius": None}
    try:
        reading["type"] = _text(_read_bytes(zone / "type")) or None
    except OSError:
        pass  # a zone without a type still has a temperature worth reporting
    try:
        raw = _text(_read_bytes(zone / "temp"))
        reading["celsius"] = int(raw) / 1000  # millidegrees Celsius
    except ValueError:
        reading["reason"] = f"{shown}/temp: not a number: {raw!r}"
    except OSError as exc:  # disabled zones answer EINVAL or ENODATA
        reading["reason"] = f"{shown}/temp: {exc.strerror or exc}"
    return reading


def _fact_throttled(root: Path, paths: tuple[str, ...]) -> Fact:
    got = _first(root, paths)
    if isinstance(got, str):
        return _missing(got)
    raw = _text(got[0])
    try:
        value = int(raw, 16)  # the driver prints "%x"; int() also takes a leading 0x
    except ValueError:
        return _missing(f"{got[1]}: not a hexadecimal number: {raw!r}")
    return _found(decode_throttled(value), got[1])


def _fact_timestamp(root: Path, paths: tuple[str, ...]) -> Fact:
    got = _first(root, paths)
    if isinstance(got, str):
        return _missing(got)
    stamp = _be32(got[0])
    if stamp is None:
        return _missing(f"{got[1]}: expected 4 bytes, got {len(got[0])}")
    return _found(stamp, got[1])


def _fact_l4t(root: Path, paths: tuple[str, ...]) -> Fact:
    got = _first(root, paths)
    if isinstance(got, str):
        return _missing(got)
    # "# R32 (release), REVISION: 7.1, GCID: ..." -> "32.7.1"
    first = _text(got[0]).splitlines()[0] if _text(got[0]) else ""
    match = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", first)
    if not match:
        return _missing(f"{got[1]}: no release line")
    return _found({"release": f"{match[1]}.{match[2]}", "line": first.lstrip("# ")}, got[1])


def _fact_cpu_model(root: Path, paths: tuple[str, ...]) -> Fact:
    for path in paths:
        fields = _cpuinfo(root) if path == "/proc/cpuinfo" else {}
        model = fields.get("model name") or fields.get("Model")
        if model:
            return _found(model, path)
    return _missing(f"{', '.join(paths)}: no \"model name\" line")


_READERS: dict[str, Callable[[Path, tuple[str, ...]], Fact]] = {
    "model": _fact_text,
    "compatible": _fact_compatible,
    "board": _fact_board,
    "memory": _fact_memory,
    "temperatures": _fact_temperatures,
    "throttled": _fact_throttled,
    "bootloader_version": _fact_text,
    "bootloader_timestamp": _fact_timestamp,
    "l4t_release": _fact_l4t,
    "cpu_model": _fact_cpu_model,
}


def read_facts(profile: Profile, root: Path = Path("/")) -> dict[str, Fact]:
    """Read the facts `profile` names under `root`; a missing one is null with a reason."""
    facts: dict[str, Fact] = {}
    for name, paths in profile.facts.items():
        try:
            facts[name] = _READERS[name](root, paths)
        except Exception as exc:  # a fact may be missing, never a crash
            facts[name] = _missing(f"cannot read: {type(exc).__name__}: {exc}")
    return facts


# -- detection -----------------------------------------------------------------


@dataclass(frozen=True)
class _Board:
    """What a root says about its board, read once for every profile."""

    models: tuple[str, ...]
    compatibles: tuple[str, ...]
    revision_type: int | None


def _board(root: Path) -> _Board:
    cpuinfo = _cpuinfo(root)
    models = tuple(m.rstrip("\0").strip() for m in (_dt_text(root, "model"),
                                                   cpuinfo.get("Model")) if m)
    compatible = _dt_text(root, "compatible") or ""
    raw = cpuinfo.get("Revision", "")
    revision_type = None
    if re.fullmatch(r"[0-9a-fA-F]{1,8}", raw) and int(raw, 16) & _NEW_STYLE:
        revision_type = (int(raw, 16) >> 4) & 0xFF
    return _Board(models, tuple(c for c in compatible.split("\0") if c), revision_type)


def _specificity(profile: Profile, board: _Board, machine: str) -> int | None:
    """How many kinds of evidence match (0 for a generic profile), None for no match."""
    if machine not in profile.machines:
        return None
    if profile.generic:
        return 0
    score = sum((
        any(clue in model for clue in profile.models for model in board.models),
        any(clue in c for clue in profile.compatibles for c in board.compatibles),
        board.revision_type is not None and board.revision_type in profile.revision_types,
    ))
    return score or None


def select(profiles: Mapping[str, Profile], root: Path, machine: str) -> Profile | None:
    """The most specific profile matching the board under `root`, or None."""
    board = _board(root)
    scored = [(score, name) for name, profile in profiles.items()
              if (score := _specificity(profile, board, machine)) is not None]
    if not scored:
        return None
    # Highest score first; a tie goes to the first name, so the answer never depends on order.
    best = min(scored, key=lambda item: (-item[0], item[1]))
    return profiles[best[1]]


def detect(root: Path, machine: str, profiles: Mapping[str, Profile] | None = None) -> Profile:
    """The most specific profile for the board under `root`; ProfileError if none fits."""
    profiles = load_profiles() if profiles is None else profiles
    found = select(profiles, root, machine)
    if found is None:
        raise ProfileError(f"no firmware profile matches this machine ({machine!r}); known:"
                           f" {', '.join(sorted(profiles))}")
    return found


def resolve(settings_profile: str, root: Path = Path("/"),
            machine: str | None = None) -> tuple[Profile | None, str]:
    """(the profile for `[node] profile`, the architecture); "auto" detects the board.

    None: no profile knows this architecture. A broken profile file raises
    ProfileError: that is the installation's fault.
    """
    machine = os.uname().machine if machine is None else machine
    profiles = load_profiles()
    if settings_profile == AUTO:
        return select(profiles, root, machine), machine
    profile = profiles.get(settings_profile)
    if profile is None:
        raise ProfileError(f"no firmware profile named {settings_profile!r}; known:"
                           f" {', '.join(sorted(profiles))}")
    return profile, machine


def facts_of(profile: Profile | None, machine: str, root: Path = Path("/")) -> dict[str, Fact]:
    """The facts of a resolved profile (blocks: reads files), `machine` first."""
    facts = {"machine": _found(machine, "uname -m")}
    if profile is not None:
        facts.update(read_facts(profile, root))
    return facts


def facts_for(settings_profile: str, root: Path = Path("/"),
              machine: str | None = None) -> tuple[str, dict[str, Fact]]:
    """(profile name, facts) for `[node] profile` ("auto" detects); never raises for the board.

    An architecture no profile knows gives ("unknown", facts holding only `machine`).
    A broken profile file still raises ProfileError: that is the installation's fault.
    """
    profile, machine = resolve(settings_profile, root, machine)
    return (UNKNOWN if profile is None else profile.name), facts_of(profile, machine, root)
