"""Mutual TLS for the migration link: certificates checked both ways against a private CA."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from migrate.errors import TransportError


@dataclass(frozen=True)
class Tls:
    """Mutual TLS: our certificate and key, and the CA that must have signed the peer's."""

    cert: str
    key: str
    ca: str

    def context(self, server: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
            ctx.load_verify_locations(self.ca)
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"TLS setup: {e}") from e
        ctx.verify_mode = ssl.CERT_REQUIRED  # both ways: the peer's certificate must chain to `ca`
        ctx.check_hostname = False  # peers are pinned by the private CA, not by DNS names
        return ctx
