"""A test CA made in the test (cryptography): broker and device certificates as PEM files.

`Pki(directory)` makes a CA and writes `ca.pem`; `server()` issues the broker's
certificate (SAN 127.0.0.1 and localhost unless told otherwise) and
`client(cn)` a device's, CN = node id. Either can be expired or not yet valid.
A second `Pki` in another directory is "the wrong CA". EC P-256 keys: quick
to make, and what a small device would use.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertFiles", "Pki"]

_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key, each in its own PEM file."""

    cert: Path
    key: Path
    not_after: datetime.datetime


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    path.chmod(0o600)


class Pki:
    """One certificate authority under `directory`, issuing certificates as files there."""

    def __init__(self, directory: Path, name: str = "edge test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + 365 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def _issue(self, stem: str, common_name: str, *, server: bool, hosts: tuple[str, ...],
               expired: bool, not_yet_valid: bool) -> CertFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = now - _DAY, now + 30 * _DAY
        if expired:
            start, end = now - 10 * _DAY, now - _DAY
        if not_yet_valid:
            start, end = now + 10 * _DAY, now + 40 * _DAY
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        files = CertFiles(self.directory / f"{stem}.crt", self.directory / f"{stem}.key",
                          end.replace(microsecond=0))
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, files.key)
        return files

    def server(self, stem: str = "server", *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
               expired: bool = False) -> CertFiles:
        """The broker's certificate, valid for `hosts` (SAN)."""
        return self._issue(stem, hosts[0] if hosts else "broker", server=True, hosts=hosts,
                           expired=expired, not_yet_valid=False)

    def listener_lines(self, server: CertFiles, *, client_certificates: bool = True) -> list[str]:
        """mosquitto.conf lines for the listener above them: TLS with `server`, and with
        `client_certificates` a certificate from this CA required, its CN the user name."""
        lines = [f"cafile {self.ca_file}", f"certfile {server.cert}", f"keyfile {server.key}"]
        if client_certificates:
            lines += ["require_certificate true", "use_identity_as_username true"]
        return lines

    def client(self, common_name: str, stem: str | None = None, *, expired: bool = False,
               not_yet_valid: bool = False) -> CertFiles:
        """A device's (or the registry's) certificate with CN = `common_name`."""
        return self._issue(stem or common_name, common_name, server=False, hosts=(),
                           expired=expired, not_yet_valid=not_yet_valid)
