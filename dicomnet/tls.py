"""TLS for DICOM associations: contexts after PS3.15 Annex B.9 (BCP 195), and peers.

`server_context()` and `client_context()` build `ssl.SSLContext`s for the "BCP 195 TLS
Profile" of PS3.15 §B.9 (RFC 9325, formerly RFC 7525): TLS 1.2 at least, TLS 1.3
preferred (OpenSSL negotiates the highest both sides offer); for TLS 1.2 only the AEAD
suites with forward secrecy (ECDHE/DHE with AES-GCM or ChaCha20-Poly1305); no TLS
compression, no renegotiation, no session tickets that would defeat forward secrecy of
long-lived server keys. TLS 1.3's own suites are all AEAD and are kept as OpenSSL sets
them. These interoperate with DCMTK's default "Non-downgrading BCP 195" profile (`+py`)
and with pynetdicom over Python's `ssl`.

A `Peer` is an entry of an AE's peer table (move destinations, storage commitment
report destinations) that also says how to secure the connection to it.
"""

from __future__ import annotations

import ssl
from os import PathLike
from typing import Any

__all__ = [
    "BCP195_CIPHERS",
    "Peer",
    "TLSConfigError",
    "client_context",
    "describe_failure",
    "server_context",
    "subject_text",
]

# RFC 9325 §4.2 recommended TLS 1.2 suites (ECDSA and RSA authentication), plus the
# ChaCha20-Poly1305 ones of the same families; all AEAD with (EC)DHE key exchange.
BCP195_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    )
)

StrPath = str | PathLike[str]


class TLSConfigError(ValueError):
    """A certificate, key or CA file that cannot be used (missing, unreadable, mismatched)."""


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_NO_TICKET
    )
    return context


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason code as words ("key values mismatch")."""
    return str(exc.reason or exc).lower().replace("_", " ")


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    raise _EncryptedKey


def _load_chain(
    context: ssl.SSLContext, cert: StrPath, key: StrPath | None, password: str | None
) -> None:
    """Load our certificate and key; an encrypted key without `password` is an error
    (never a prompt on the terminal, which would hang a service)."""
    try:
        context.load_cert_chain(cert, key, password if password is not None else _no_password)
    except _EncryptedKey:
        raise TLSConfigError(
            f"the private key {key or cert} is encrypted: give its password, or the key "
            "unencrypted (readable by this user only)"
        ) from None
    except FileNotFoundError as exc:
        raise TLSConfigError(f"{exc.filename or cert}: no such file") from None
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"cannot use certificate {cert} with key {key or cert}: {_reason(exc)}"
        ) from None
    except OSError as exc:
        raise TLSConfigError(f"{exc.filename or cert}: {exc.strerror or exc}") from None


def _load_ca(context: ssl.SSLContext, ca: StrPath) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except FileNotFoundError:
        raise TLSConfigError(f"{ca}: no such file") from None
    except ssl.SSLError as exc:
        raise TLSConfigError(f"cannot read CA certificates from {ca}: {_reason(exc)}") from None
    except OSError as exc:
        raise TLSConfigError(f"{ca}: {exc.strerror or exc}") from None


def client_context(
    ca: StrPath | None = None,
    cert: StrPath | None = None,
    key: StrPath | None = None,
    *,
    check_hostname: bool = False,
    password: str | None = None,
) -> ssl.SSLContext:
    """A context to request associations over TLS (PS3.15 §B.9, BCP 195).

    The server's certificate is always verified: against the certificates in `ca` (a PEM
    file), or the system's trust store when `ca` is None. `cert` and `key` (PEM; `key`
    may be omitted when `cert` holds both) are presented when the server asks for a
    client certificate; `password` decrypts an encrypted key (without it, an encrypted key
    is a `TLSConfigError`, never a prompt).

    `check_hostname` is off by default: DICOM peers are configured by address and AE
    title and are often reached by IP address, and their certificates name the node or
    the organisation rather than a DNS name. DCMTK verifies the chain of trust only and
    never compares host names, and dcm4che does not either unless told to; PS3.15 §B.9
    requires the chain to be verified, not the name. Turn it on when certificates carry
    the host name (or IP address) the peer is reached by.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = check_hostname
    if ca is not None:
        _load_ca(context, ca)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None:
        _load_chain(context, cert, key, password)
    elif key is not None:
        raise TLSConfigError("a private key was given without its certificate")
    return _harden(context)


def server_context(
    cert: StrPath,
    key: StrPath | None = None,
    ca: StrPath | None = None,
    *,
    password: str | None = None,
) -> ssl.SSLContext:
    """A context to accept associations over TLS (PS3.15 §B.9, BCP 195).

    `cert` and `key`: our certificate (chain) and private key, PEM. With `ca`, every
    requestor must present a certificate that chains to one in `ca` (CERT_REQUIRED: no
    certificate, or one from another CA, fails the handshake); without it, no client
    certificate is asked for. `password`: as for `client_context`.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(context, cert, key, password)
    if ca is not None:
        _load_ca(context, ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return _harden(context)


# Short names of RFC 4514 §3 (and the usual extras) for `subject_text`.
_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "emailAddress",
    "serialNumber": "serialNumber",
}


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def subject_text(certificate: dict[str, Any] | None) -> str | None:
    """The subject of a certificate as `ssl.SSLSocket.getpeercert()` gives it, as an RFC
    4514 string ("CN=node1,O=Hospital,C=CH": most specific first); None without one."""
    if not certificate or "subject" not in certificate:
        return None
    parts = []
    for rdn in reversed(certificate["subject"]):
        parts.append(
            "+".join(f"{_SHORT_NAMES.get(name, name)}={_escape(str(value))}" for name, value in rdn)
        )
    return ",".join(parts)


class Peer(tuple[str, int]):
    """A peer table entry: `(host, port)`, and the TLS context to connect with (None: plain
    TCP). It is the `(host, port)` tuple it replaces, so code that unpacks the peer table
    keeps working: `AE(peers={"ARCHIVE": Peer("10.0.0.5", 2762, tls=client_context(ca))})`.
    """

    tls: ssl.SSLContext | None

    def __new__(cls, host: str, port: int, tls: ssl.SSLContext | None = None) -> Peer:
        peer = super().__new__(cls, (host, int(port)))
        peer.tls = tls
        return peer

    def __getnewargs__(self) -> tuple[str, int, ssl.SSLContext | None]:
        return (self[0], self[1], self.tls)

    @property
    def host(self) -> str:
        return self[0]

    @property
    def port(self) -> int:
        return self[1]

    def __repr__(self) -> str:
        secured = ", tls=..." if self.tls is not None else ""
        return f"Peer({self[0]!r}, {self[1]}{secured})"


# OpenSSL reasons that mean the other side does not speak TLS (or not this version).
_NOT_TLS = {
    "WRONG_VERSION_NUMBER",
    "UNKNOWN_PROTOCOL",
    "HTTP_REQUEST",
    "PACKET_LENGTH_TOO_LONG",
    "RECORD_LAYER_FAILURE",
    "UNSUPPORTED_PROTOCOL",
    "TLSV1_ALERT_PROTOCOL_VERSION",
}


def describe_failure(exc: BaseException, *, server: bool = False, timeout: float = 0.0) -> str:
    """Why a TLS connection failed, in one line, with a hint where one fits (for the
    requestor's error and the acceptor's log)."""
    if isinstance(exc, ConnectionAbortedError) and "handshake" in str(exc):
        return f"no handshake within {timeout:g} s (a stalled peer, or one not using TLS?)"
    if isinstance(exc, TimeoutError):
        return f"no handshake within {timeout:g} s (a stalled peer, or one not using TLS?)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        whose = "client certificate" if server else "certificate"
        return f"{whose} verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLEOFError) or (
        isinstance(exc, ssl.SSLError) and exc.reason == "UNEXPECTED_EOF_WHILE_READING"
    ):
        if server:
            return "the peer closed the connection during the handshake (did it refuse ours?)"
        return (
            "the peer closed the connection during the handshake "
            "(is the peer using TLS? does it accept our certificate?)"
        )
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc)
        text = reason.lower().replace("_", " ")
        if reason in _NOT_TLS:
            hint = (
                "a plain DICOM connection to the TLS port?" if server else "is the peer using TLS?"
            )
            return f"{text} ({hint})"
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "the peer presented no certificate (one is required)"
        if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
            return "the peer requires a client certificate (--tls-cert/--tls-key; route: tls_cert)"
        if "ALERT" in reason:
            return f"the peer refused the connection: {text}"
        return text
    if isinstance(exc, ConnectionResetError):
        hint = " (did it refuse our certificate?)" if server else " (is the peer using TLS?)"
        return f"the peer reset the connection during the handshake{hint}"
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    return f"{type(exc).__name__}: {exc}"
