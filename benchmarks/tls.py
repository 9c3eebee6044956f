"""Certificates for the TLS pairings: one CA, a server and a client certificate (ECDSA
P-256, as a current PKI would issue), made with `cryptography` once per run in a
temporary folder that is removed at exit.

Every TLS pairing requires and verifies client certificates on both sides (DCMTK's
`storescp +tls` default, `-rc`; `dicomnet serve --tls-ca`), so the work per handshake is
the same for all of them.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import ipaddress
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PKI", "pki"]


@dataclass(frozen=True, slots=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _issue(folder: Path, stem: str, cn: str, ca_key: object, ca_name: object) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer = ca_name if isinstance(ca_name, x509.Name) else None
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
    else:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    signer = ca_key if issuer is not None else key
    cert = builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@functools.cache
def pki() -> PKI:
    """The run's certificates (made on first use)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    folder = Path(tempfile.mkdtemp(prefix="dicomnet-bench-tls-"))
    atexit.register(shutil.rmtree, folder, True)
    ca_cert, ca_key_path = _issue(folder, "ca", "dicomnet bench CA", None, None)
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    ca_name = x509.load_pem_x509_certificate(ca_cert.read_bytes()).subject
    server_cert, server_key = _issue(folder, "server", "bench-scp", ca_key, ca_name)
    client_cert, client_key = _issue(folder, "client", "bench-scu", ca_key, ca_name)
    return PKI(ca_cert, server_cert, server_key, client_cert, client_key)
