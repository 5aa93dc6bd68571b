"""TLS for meshllm's gRPC connections (client → router, router → replica), shared by the router,
the replica and the client: which PEM files to use, read and checked once when the settings are
made (errors name the setting, never a traceback), and the gRPC credentials built from them.

Plaintext — no TLS settings at all — stays the default, for local development only.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc

from meshllm.api.errors import FieldViolation, InvalidArgument, invalid_argument

ChannelOptions = Sequence[tuple[str, str | int]]


@dataclass(frozen=True, kw_only=True)
class ServerTLS:
    """A server's TLS: its certificate (chain) and private key, PEM files. With ``client_ca``,
    mutual TLS: every client must present a certificate signed by that CA, or its handshake fails.

    Raises InvalidArgument naming the setting (``tls_cert``, ...) when a file cannot be read, is
    not PEM, or the key does not match the certificate.
    """

    cert: str
    key: str
    client_ca: str = ""
    prefix: str = field(default="tls_", repr=False, compare=False)
    """How errors name these settings: ``tls_`` gives ``tls_cert``, ``tls_key``, ``tls_client_ca``."""
    _pem: tuple[bytes, bytes, bytes | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self.prefix
        if self.cert or self.key:
            _raise(_pair(self.cert, self.key, p))
        elif self.client_ca:
            _fail(p + "client_ca", f"needs {p}cert and {p}key")
        else:
            _raise(
                [
                    FieldViolation(p + "cert", "must be set for TLS"),
                    FieldViolation(p + "key", "must be set for TLS"),
                ]
            )
        cert, key = _load_pair(self.cert, self.key, p)
        ca = _load_ca(self.client_ca, p + "client_ca") if self.client_ca else None
        object.__setattr__(self, "_pem", (cert, key, ca))

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate."""
        return bool(self.client_ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self._pem
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


@dataclass(frozen=True, kw_only=True)
class ChannelTLS:
    """TLS for a channel to a meshllm server. All fields are optional: ``ChannelTLS()`` is TLS
    that trusts the system's root certificates.

    Raises InvalidArgument naming the setting (``tls_ca``, ...) when a file cannot be read, is not
    PEM, the key does not match the certificate, or only one of cert and key is given.
    """

    ca: str = ""
    """PEM file of the CA(s) that signed the server's certificate ("": the system's roots)."""
    cert: str = ""
    """PEM client certificate, for servers that require mutual TLS (with ``key``)."""
    key: str = ""
    """The client certificate's private key, PEM, unencrypted."""
    server_name: str = ""
    """The name to check the server's certificate against, when the address does not carry it
    (e.g. an IP address or a pod name); "" checks the target's host."""
    prefix: str = field(default="tls_", repr=False, compare=False)
    """How errors name these settings: ``tls_`` gives ``tls_ca``, ``tls_cert``, ``tls_key``."""
    _pem: tuple[bytes | None, bytes | None, bytes | None] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        p = self.prefix
        _raise(_pair(self.cert, self.key, p))
        ca = _load_ca(self.ca, p + "ca") if self.ca else None
        cert, key = _load_pair(self.cert, self.key, p) if self.cert else (None, None)
        object.__setattr__(self, "_pem", (ca, cert, key))

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self._pem
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def channel_options(self) -> list[tuple[str, str]]:
        """Options that go with the credentials (the name to check the certificate against)."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def tls_mode(tls: ServerTLS | None, health_port: int | None = None) -> str:
    """How a server listens, for its start-up log line."""
    mode = "plaintext" if tls is None else "mutual TLS" if tls.mutual else "TLS"
    return mode if health_port is None else f"{mode}; plaintext health on {health_port}"


def channel(target: str, tls: ChannelTLS | None, options: ChannelOptions = ()) -> grpc.aio.Channel:
    """An asyncio channel to ``target``: TLS when ``tls`` is given, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(
        target, tls.channel_credentials(), options=[*options, *tls.channel_options()]
    )


def _pair(cert: str, key: str, prefix: str) -> list[FieldViolation]:
    if bool(cert) == bool(key):
        return []
    missing, given = ("key", "cert") if cert else ("cert", "key")
    return [FieldViolation(prefix + missing, f"must be set together with {prefix}{given}")]


def _load_pair(cert: str, key: str, prefix: str) -> tuple[bytes, bytes]:
    cert_pem, key_pem = _read(cert, prefix + "cert"), _read(key, prefix + "key")
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        _fail(prefix + "cert", f"{cert} is not a PEM certificate")
    if b"PRIVATE KEY-----" not in key_pem:
        _fail(prefix + "key", f"{key} is not a PEM private key")
    if b"ENCRYPTED PRIVATE KEY-----" in key_pem or b"Proc-Type: 4,ENCRYPTED" in key_pem:
        _fail(prefix + "key", f"{key} is encrypted; gRPC needs an unencrypted key")
    # gRPC would find a key that does not match only when binding the port ("Failed to bind")
    # or at the first handshake; OpenSSL's own check here names the files instead.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            _fail(prefix + "key", f"{key} does not match the certificate in {cert}")
        _fail(prefix + "key", f"{key} and {cert} are not a usable pair: {e}")
    except OSError as e:  # a file went away since it was read
        _fail(prefix + "cert", f"cannot read {cert} or {key}: {e.strerror or e}")
    return cert_pem, key_pem


def _load_ca(path: str, setting: str) -> bytes:
    pem = _read(path, setting)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=pem.decode("ascii", errors="replace")
        )
    except ssl.SSLError:
        _fail(setting, f"{path} holds no PEM certificate")
    return pem


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        _fail(setting, f"cannot read {path}: {e.strerror or e}")


def _raise(bad: list[FieldViolation]) -> None:
    if bad:
        raise InvalidArgument(
            "; ".join(f"{v.field}: {v.description}" for v in bad), field_violations=bad
        )


def _fail(setting: str, description: str) -> NoReturn:
    raise invalid_argument(setting, description)
