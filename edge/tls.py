"""TLS and credentials for the MQTT connections (mqtts://).

A context is built afresh from the files at every connection attempt, so a
certificate, key or CA file replaced on disk is used at the next reconnect
without a restart. Everything that can be checked before connecting is
(unreadable files, a certificate that expired or is not valid yet, a key that
is not one or does not match the certificate), and a failed handshake or an
alert from the broker is turned into one line that names the file and the
reason. Reading files blocks: call `client_context` and `Login.read` off the
event loop.
"""

from __future__ import annotations

import datetime
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge.errors import UplinkError

# cryptography (about 7 MiB of memory) is imported only when a certificate is read:
# an agent on mqtt:// never loads it.
if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["Login", "TlsFiles", "client_context", "explain"]

_MAX_FILE = 1024 * 1024  # PEM files and password files are small: bounded reads
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_PEM_KEY = re.compile(rb"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----",
                      re.S)

# OpenSSL's verify codes (X509_V_ERR_*) for the broker's certificate.
_NOT_OUR_CA = {2, 18, 19, 20, 21}  # issuer unknown, self-signed, not in the CA file
_EXPIRED, _NOT_YET = 10, 9
# Alerts the broker sends when it refuses this side's certificate (TLS 1.3: after the
# handshake, on the first read).
_ALERTS = {
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it says the certificate has expired",
    "TLSV1_ALERT_UNKNOWN_CA": "it does not trust the CA that signed it (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it says the certificate is bad",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it says the certificate was revoked",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "it does not support this kind of certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it could not check the certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "it denies this certificate access",
    "TLSV1_ALERT_DECRYPT_ERROR": "the certificate's signature did not check out (wrong key?)",
}


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The files an mqtts:// connection is made with, and what to call them in messages."""

    ca_file: Path | None = None    # None: the system's CA store
    cert_file: Path | None = None  # this side's certificate (mutual TLS)
    key_file: Path | None = None   # its key; None: in cert_file
    verify: bool = True            # False: the broker's certificate is not checked at all
    # How a message names each file: the config keys, or the registry's flags.
    names: tuple[str, str, str] = ("[uplink] ca_file", "[uplink] cert_file", "[uplink] key_file")


@dataclass(frozen=True, slots=True)
class Login:
    """An MQTT user name and where its password is (the first line of a file)."""

    username: str
    password_file: Path | None = None
    name: str = "[uplink] password_file"

    def read(self) -> tuple[str, str | None]:
        """(user name, password or None), the password read now; UplinkError names the file."""
        if self.password_file is None:
            return self.username, None
        text = _read(self.password_file, self.name, "password file")
        try:
            password = text.decode().splitlines()[0] if text else ""
        except UnicodeDecodeError:
            raise UplinkError(f"{self.name} {self.password_file}: not UTF-8 text") from None
        if not password:
            raise UplinkError(f"{self.name} {self.password_file}: the first line is empty;"
                              " it should hold the password")
        return self.username, password

    def describe(self) -> str:
        """The user and the password's file, for a refusal message (never the password)."""
        where = f", password from {self.password_file}" if self.password_file else ", no password"
        return f"user {self.username!r}{where}"


def _read(path: Path, name: str, what: str) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_FILE + 1)
    except OSError as exc:
        raise UplinkError(f"{name} {path}: cannot read the {what}: "
                          f"{exc.strerror or exc}") from exc
    if len(data) > _MAX_FILE:
        raise UplinkError(f"{name} {path}: over {_MAX_FILE // 1024} KiB; not a {what}?")
    return data


def _stamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _certificates(data: bytes, name: str, path: Path) -> list[x509.Certificate]:
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise UplinkError(f"{name} {path}: no PEM certificate in it"
                          " (expected -----BEGIN CERTIFICATE-----)")
    from cryptography import x509

    try:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as exc:
        raise UplinkError(f"{name} {path}: a certificate in it cannot be read: {exc}") from exc


def _check_dates(cert: x509.Certificate, name: str, path: Path,
                 now: datetime.datetime) -> None:
    if now > cert.not_valid_after_utc:
        raise UplinkError(f"{name} {path}: the certificate expired on "
                          f"{_stamp(cert.not_valid_after_utc)}; put a renewed one in its place"
                          " (it is read again at every reconnect)")
    if now < cert.not_valid_before_utc:
        raise UplinkError(f"{name} {path}: the certificate is not valid before "
                          # The day, not the second: the message (warned once while it
                          # stays the same) must not change at every attempt.
                          f"{_stamp(cert.not_valid_before_utc)} (the device's clock says"
                          f" {now:%Y-%m-%d});"
                          " is this device's clock right?")


def _check_key(files: TlsFiles, leaf: x509.Certificate) -> Path:
    """Read the private key and check it belongs to the certificate; return its path."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert files.cert_file is not None
    path = files.key_file or files.cert_file
    name = files.names[2] if files.key_file else files.names[1]
    match = _PEM_KEY.search(_read(path, name, "private key"))
    if match is None:
        raise UplinkError(f"{name} {path}: no PEM private key in it"
                          " (expected -----BEGIN PRIVATE KEY-----)")
    if b"ENCRYPTED" in match.group(1) or b"Proc-Type: 4,ENCRYPTED" in match.group(0):
        raise UplinkError(f"{name} {path}: the private key is encrypted; edge needs it"
                          " unencrypted (protect the file with its permissions instead)")
    try:
        key = serialization.load_pem_private_key(match.group(0), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise UplinkError(f"{name} {path}: the private key cannot be read: {exc}") from exc
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise UplinkError(f"{name} {path}: this key does not belong to the certificate in"
                          f" {files.names[1]} {files.cert_file} (their public keys differ)")
    return path


def client_context(files: TlsFiles, *, now: datetime.datetime | None = None) -> ssl.SSLContext:
    """A client context from the files as they are now; UplinkError says what is wrong."""
    now = now or datetime.datetime.now(datetime.UTC)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, checks the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    ca_name, cert_name, _ = files.names
    if not files.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif files.ca_file is not None:
        data = _read(files.ca_file, ca_name, "CA file")
        _certificates(data, ca_name, files.ca_file)
        try:
            context.load_verify_locations(cadata=data.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise UplinkError(f"{ca_name} {files.ca_file}: not usable as CA certificates:"
                              f" {exc.reason or exc}") from exc
    else:
        context.load_default_certs()
    if files.cert_file is not None:
        data = _read(files.cert_file, cert_name, "certificate")
        leaf = _certificates(data, cert_name, files.cert_file)[0]
        _check_dates(leaf, cert_name, files.cert_file, now)
        key_path = _check_key(files, leaf)
        try:
            context.load_cert_chain(files.cert_file, key_path)
        except (ssl.SSLError, OSError) as exc:  # replaced between the checks and here
            raise UplinkError(f"{cert_name} {files.cert_file}: cannot be loaded with its key"
                              f" {key_path}: {getattr(exc, 'reason', None) or exc}") from exc
    return context


def explain(exc: ssl.SSLError, files: TlsFiles, host: str, port: int) -> str:
    """One line for a failed handshake, or for an alert the broker sent after it."""
    ca_name, cert_name, _ = files.names
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, why = exc.verify_code, exc.verify_message
        if "mismatch" in why:
            return (f"the broker's certificate is not valid for {host!r}, the host in the"
                    f" url ({why.rstrip('.')}): connect to a name the certificate has, or"
                    f" have the broker's certificate issued for {host!r}")
        if code in _NOT_OUR_CA:
            where = (f"{ca_name} {files.ca_file}" if files.ca_file is not None
                     else f"the system's CA store ({ca_name} is not set)")
            return (f"the broker's certificate ({host}:{port}) is not signed by a CA in {where}:"
                    f" certificate verify failed: {why}; is that the CA that issued the"
                    " broker's certificate?")
        if code == _EXPIRED:
            return f"the broker's certificate ({host}:{port}) has expired; the broker must renew it"
        if code == _NOT_YET:
            return (f"the broker's certificate ({host}:{port}) is not valid yet;"
                    " is this device's clock right?")
        return f"the broker's certificate ({host}:{port}) was refused: {why}"
    reason = exc.reason or ""
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED" or (
            reason == "SSLV3_ALERT_HANDSHAKE_FAILURE" and files.cert_file is None):
        return (f"the broker at {host}:{port} wants a client certificate: set {cert_name}"
                " (and its key)")
    if reason in _ALERTS:
        which = f"{cert_name} {files.cert_file}" if files.cert_file else "this side's certificate"
        return f"the broker refused {which}: {_ALERTS[reason]} ({reason.lower()})"
    if reason in ("WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE"):
        return (f"no TLS handshake with {host}:{port} ({reason.lower()}): is it a TLS listener?"
                " (mqtts:// needs one; plain MQTT is usually port 1883)")
    return f"TLS with {host}:{port} failed: {reason.lower() or exc}"
