"""HTTPS: a development CA and server certificate made with ``cryptography``, and the
server's SSL context (TLS 1.3 minimum, optional client certificates for mTLS).

Production points ``[tls] cert_file``/``key_file`` (and ``client_ca_file``) at real files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.settings import TlsSettings

DEV_TLS_DIR = "tls"
_VERIFY_MODES = {
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
_DEV_NAMES = ("localhost",)
_DEV_ADDRESSES = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class DevTls:
    """Where ``init`` keeps the development CA and the server certificate it signed."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> DevTls:
        return cls(
            directory / "ca.pem",
            directory / "ca.key",
            directory / "server.pem",
            directory / "server.key",
        )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kzg-gateway development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def issue_certificate(
    subject: str,
    ca_key: ec.EllipticCurvePrivateKey | None = None,
    ca_cert: x509.Certificate | None = None,
    *,
    server_names: tuple[str, ...] = (),
    addresses: tuple[str, ...] = (),
    client: bool = False,
    days: int = 825,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return a fresh P-256 key and its certificate: self-signed CA when ``ca_key`` is
    None, else a leaf signed by the CA for a server (names) or a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    is_ca = ca_key is None
    issuer = _name(subject) if is_ca else ca_cert.subject  # type: ignore[union-attr]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        ).add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        alt: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
        alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    signer = key if is_ca else ca_key
    return key, builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]


def ensure_dev_tls(directory: Path) -> DevTls:
    """Create the development CA and a server certificate for localhost/127.0.0.1/::1
    unless they exist (idempotent); private keys are written 0600."""
    paths = DevTls.in_dir(directory)
    if all(p.is_file() for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)):
        return paths
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key, ca_cert = issue_certificate("kzg-gateway development CA", days=3650)
    server_key, server_cert = issue_certificate(
        "localhost", ca_key, ca_cert, server_names=_DEV_NAMES, addresses=_DEV_ADDRESSES
    )
    _write_private(paths.ca_key, _key_pem(ca_key))
    _write_private(paths.server_key, _key_pem(server_key))
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def tls_files(tls: TlsSettings, data_dir: Path) -> tuple[Path, Path]:
    """Return the server (certificate, key) paths: configured, else the dev ones."""
    dev = DevTls.in_dir(data_dir / DEV_TLS_DIR)
    return Path(tls.cert_file or dev.server_cert), Path(tls.key_file or dev.server_key)


def server_ssl_context(tls: TlsSettings, data_dir: Path) -> ssl.SSLContext:
    """Return the server context: TLS 1.3 only; with ``client_ca_file``, client
    certificates are checked as ``client_cert`` says."""
    cert_file, key_file = tls_files(tls, data_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert_file, key_file)
    if tls.client_ca_file:
        context.load_verify_locations(cafile=tls.client_ca_file)
        context.verify_mode = _VERIFY_MODES[tls.client_cert]
    return context


def certificate_not_after(path: Path) -> float:
    """Unix time at which the certificate in ``path`` (PEM) expires."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.not_valid_after_utc.timestamp()
