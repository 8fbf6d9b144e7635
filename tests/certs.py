"""Throwaway certificate authorities and certificates for the TLS tests (cryptography)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Authority:
    name: str
    key: ec.EllipticCurvePrivateKey
    pem: bytes

    @classmethod
    def create(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _builder(_name(name), _name(name), key.public_key(), ca=True).sign(
            key, hashes.SHA256()
        )
        return cls(name, key, cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, folder: Path, stem: str, *, server: bool) -> tuple[Path, Path]:
        """A certificate for ``stem`` (for localhost/127.0.0.1 when ``server``): (cert, key)."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _builder(_name(stem), _name(self.name), key.public_key(), ca=False)
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        return cert_path, key_path

    def write(self, folder: Path) -> Path:
        path = folder / f"{self.name}.pem"
        path.write_bytes(self.pem)
        return path


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: object, *, ca: bool
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
