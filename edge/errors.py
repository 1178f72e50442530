"""Exceptions raised by edge.

Every error the project raises on purpose derives from ``EdgeError``::

    EdgeError
    ├── ConfigError          a config file, flag or value is wrong
    ├── ProfileError         a firmware profile file is not valid, or none fits
    ├── EnvelopeError        a CBOR envelope could not be built or decoded
    │   ├── MessageTooLarge  over a size limit
    │   └── CborError        CBOR from outside is malformed or over a structural limit
    ├── StorageError         the outbox database failed
    │   └── QueueFull        the outbox is full and on_full = "reject"
    ├── RequestError         a socket API request is malformed or refused
    ├── DocumentError        a desired or reported state document is not valid
    ├── UplinkError          the MQTT connection failed or was refused
    ├── RegistryError        the registry server's store failed or cannot be reached
    └── AgentNotRunning      a client found no agent at the socket path
"""

from __future__ import annotations

__all__ = [
    "AgentNotRunning",
    "CborError",
    "ConfigError",
    "DocumentError",
    "EdgeError",
    "EnvelopeError",
    "MessageTooLarge",
    "ProfileError",
    "QueueFull",
    "RegistryError",
    "RequestError",
    "StorageError",
    "UplinkError",
]


class EdgeError(Exception):
    """Root of every error edge raises on purpose."""


class ConfigError(EdgeError):
    """A configuration file, flag or value is not valid."""


class ProfileError(EdgeError):
    """A firmware profile file is not valid, or no profile fits the machine."""


class EnvelopeError(EdgeError):
    """An envelope could not be built or decoded."""


class MessageTooLarge(EnvelopeError):
    """A message or frame is over a size limit."""


class CborError(EnvelopeError):
    """CBOR from outside is malformed or over a limit: depth, items, lengths, tags, keys."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # what the counters count: cbor_depth, cbor_tag, ... (edge/cbor_safe.py)


class StorageError(EdgeError):
    """The outbox database failed."""

    def __init__(self, message: str, code: str = "storage_error") -> None:
        super().__init__(message)
        self.code = code  # the socket API's error code: storage_error, storage_full, ...


class QueueFull(StorageError):
    """The outbox is at `[queue] max_bytes` and the policy is to reject."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "queue_full")


class RequestError(EdgeError):
    """A socket API request is malformed or cannot be served."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DocumentError(EdgeError):
    """A desired or reported state document is not valid."""


class UplinkError(EdgeError):
    """The MQTT uplink failed or the broker refused something."""


class RegistryError(EdgeError):
    """The registry server's store failed or cannot be reached."""


class AgentNotRunning(EdgeError):
    """No agent answers at the socket path."""
