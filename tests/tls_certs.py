"""Certificates for the TLS tests, made with `cryptography`: two CAs, and PEM files for
a server (valid, and expired), a client of the first CA, and a client of the other."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ONE_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: Path  # the CA every good certificate chains to
    other_ca: Path  # an unrelated CA
    server: KeyPair  # CN=dicomnet-server, SAN localhost and 127.0.0.1
    expired_server: KeyPair  # the same, valid until yesterday
    client: KeyPair  # CN=modality-1,O=Test Hospital, by `ca`
    other_client: KeyPair  # by `other_ca`
    other_server: KeyPair  # a server certificate by `other_ca` (untrusted by `ca`)


def _name(cn: str, org: str = "Test Hospital") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


class _CA:
    def __init__(self, name: str, folder: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(name, "Test CA")
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - ONE_DAY)
            .not_valid_after(now + 30 * ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = _write_cert(self.cert, folder / f"{name}.pem")
        self.folder = folder

    def issue(self, stem: str, cn: str, *, expired: bool = False) -> KeyPair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (
            (now - 30 * ONE_DAY, now - ONE_DAY) if expired else (now - ONE_DAY, now + 30 * ONE_DAY)
        )
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return KeyPair(
            _write_cert(cert, self.folder / f"{stem}.crt"),
            _write_key(key, self.folder / f"{stem}.key"),
        )


def make_pki(folder: Path) -> PKI:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _CA("ca", folder)
    other = _CA("other-ca", folder)
    return PKI(
        ca=ca.path,
        other_ca=other.path,
        server=ca.issue("server", "dicomnet-server"),
        expired_server=ca.issue("expired-server", "dicomnet-server", expired=True),
        client=ca.issue("client", "modality-1"),
        other_client=other.issue("other-client", "intruder"),
        other_server=other.issue("other-server", "rogue-server"),
    )
