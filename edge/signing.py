"""Ed25519 signatures on desired documents: keys, the signed wrapper, verification.

A signed desired document on `{prefix}/nodes/{node}/desired` is a CBOR map

    {"v": 1, "doc": bstr, "kid": text, "sig": bstr(64)}

`doc` is the desired document's CBOR, byte for byte as signed, so verifying
needs no canonical re-encoding; it names the node and the version, so the
signature binds both. `sig` is the Ed25519 signature of `CONTEXT + doc` (the
context keeps a signature made with the same key for anything else from
passing as one of these). `kid` says which key signed: the first 8 bytes of
the SHA-256 of the raw 32-byte public key, in hex. See docs/registry.md.

Keys are files: the registry's private key is PEM (PKCS#8, unencrypted); a
public key is PEM (`PUBLIC KEY`) or one line of base64 of the raw 32 bytes.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.documents import encode
from edge.errors import ConfigError, DocumentError

# cryptography costs an agent about 7 MiB of memory: it is imported only where a key is
# used, so an agent with no [state] desired_keys never loads it.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "CONTEXT",
    "Keyring",
    "SignatureError",
    "Signed",
    "Signer",
    "configured_keyring",
    "generate_key",
    "is_signed",
    "key_id",
    "load_keyring",
    "load_public_key",
    "load_signer",
    "public_key_text",
    "unwrap",
]

CONTEXT = b"edge desired v1\x00"
_WRAPPER_KEYS = frozenset({"v", "doc", "kid", "sig"})
_KEY_FILE_MAX = 64 * 1024  # a key file is a few hundred bytes: anything bigger is not one


class SignatureError(DocumentError):
    """A signed document whose signature does not hold; `kind` says how."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "unknown_key" or "bad_signature"


@dataclass(frozen=True, slots=True)
class Signed:
    """A signed wrapper, taken apart but not yet verified."""

    doc: bytes
    kid: str
    sig: bytes


def key_id(key: Ed25519PublicKey) -> str:
    """The key's id: hex of the first 8 bytes of SHA-256 of its raw 32 bytes."""
    return hashlib.sha256(_raw(key)).digest()[:8].hex()


def _raw(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Signer:
    """The registry's private key: signs desired documents."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key()
        self.kid = key_id(self.public_key)

    def wrap(self, doc: bytes) -> bytes:
        """The signed wrapper (CBOR) around the CBOR bytes of a desired document."""
        return encode({"v": 1, "doc": doc, "kid": self.kid,
                       "sig": self._key.sign(CONTEXT + doc)})


class Keyring:
    """The public keys a node accepts desired documents from (any one of them will do)."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {key_id(key): key for key in keys}

    @property
    def kids(self) -> tuple[str, ...]:
        """The ids of the keys, in the order given."""
        return tuple(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def verify(self, signed: Signed) -> None:
        """Return if a key of the ring made the signature; SignatureError otherwise."""
        from cryptography.exceptions import InvalidSignature

        key = self._keys.get(signed.kid)
        if key is None:
            raise SignatureError("unknown_key", f"signed by an unknown key (kid {signed.kid};"
                                                f" known: {', '.join(self._keys) or 'none'})")
        try:
            key.verify(signed.sig, CONTEXT + signed.doc)
        except InvalidSignature:
            raise SignatureError("bad_signature", f"bad signature (kid {signed.kid}): the"
                                 " document was changed, or that key did not sign it") from None


def is_signed(outer: Mapping[Any, Any]) -> bool:
    """Whether a decoded map is a signed wrapper rather than a desired document."""
    return "sig" in outer or "doc" in outer


def unwrap(outer: Mapping[Any, Any]) -> Signed:
    """Take a signed wrapper apart; DocumentError if it is not a well-formed one."""
    what = "desired: signed wrapper"
    unknown = sorted(str(k) for k in outer if k not in _WRAPPER_KEYS)
    if unknown:
        raise DocumentError(f"{what}: unknown key {unknown[0]!r} (known: doc, kid, sig, v)")
    if outer.get("v") != 1:
        raise DocumentError(f"{what}: v: expected 1, got {outer.get('v')!r:.40}")
    doc, kid, sig = outer.get("doc"), outer.get("kid"), outer.get("sig")
    if not isinstance(doc, bytes):
        raise DocumentError(f"{what}: doc: expected the document's CBOR as a byte string,"
                            f" got {type(doc).__name__}")
    if not isinstance(kid, str) or not 1 <= len(kid) <= 64 or not kid.isprintable():
        raise DocumentError(f"{what}: kid: expected a key id (text), got {kid!r:.40}")
    if not isinstance(sig, bytes) or len(sig) != 64:
        shown = f"{len(sig)} bytes" if isinstance(sig, bytes) else type(sig).__name__
        raise DocumentError(f"{what}: sig: expected 64 bytes, got {shown}")
    return Signed(doc=doc, kid=kid, sig=sig)


# ---- key files --------------------------------------------------------------------------


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(_KEY_FILE_MAX + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > _KEY_FILE_MAX:
        raise ConfigError(f"{path}: larger than {_KEY_FILE_MAX // 1024} KiB; not a key file")
    return data


def load_signer(path: Path) -> Signer:
    """The registry's Ed25519 private key from a PEM file; ConfigError names the file."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography: "Password was not given but private key is encrypted"
        raise ConfigError(f"{path}: the private key is encrypted; give an unencrypted"
                          " one (keep the file mode 0600)") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path}: not a PEM private key (make one with"
                          " `edge registry keygen --out FILE`)") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: expected an Ed25519 private key, got"
                          f" {type(key).__name__.removeprefix('_')}")
    return Signer(key)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM or one base64 line of 32 bytes; ConfigError names it."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_key_file(path)
    expected = ("expected an Ed25519 public key: PEM (-----BEGIN PUBLIC KEY-----) or one"
                " line of base64 of its 32 raw bytes")
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"{path}: this is a private key; give the node the public one"
                          " (the .pub file `edge registry keygen` wrote next to it)")
    if data.lstrip().startswith(b"-----"):
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"{path}: {expected}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{path}: {expected}, got {type(key).__name__.removeprefix('_')}")
        return key
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{path}: {expected}") from exc
    if len(raw) != 32:
        raise ConfigError(f"{path}: {expected}; the base64 line holds {len(raw)} bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_keyring(paths: Iterable[Path]) -> Keyring:
    """The public keys from these files; ConfigError names the file that is wrong."""
    return Keyring(load_public_key(path) for path in paths)


def configured_keyring(paths: Iterable[Path], source: str) -> Keyring:
    """`[state] desired_keys` of the config `source`; ConfigError names the key and file."""
    try:
        return load_keyring(paths)
    except ConfigError as exc:
        raise ConfigError(f"config {source}: [state] desired_keys: {exc}") from exc


def public_key_text(key: Ed25519PublicKey) -> str:
    """The public key as PEM, the form `.pub` files and `[state] desired_keys` take."""
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def generate_key(out: Path) -> Signer:
    """Write a new private key to `out` (mode 0600) and its public key to `out`.pub.

    Neither file may exist: a key is never overwritten (FileExistsError). OSError
    for any other failure.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub = out.with_name(out.name + ".pub")
    if os.path.lexists(pub):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(pub))
    key = Ed25519PrivateKey.generate()
    _write_new(out, key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()), 0o600)
    signer = Signer(key)
    _write_new(pub, public_key_text(signer.public_key).encode(), 0o644)
    return signer


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `data` and `mode` from the start; FileExistsError if it is there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
