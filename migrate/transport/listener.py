"""The target's listening socket: where sources connect, each authenticated before a byte is read."""

from __future__ import annotations

import errno
import socket
import ssl

from migrate.errors import CannotListen, TransportError
from migrate.transport.connection import Connection
from migrate.transport.framing import is_loopback, parse_address
from migrate.transport.tls import Tls


class Listener:
    """The target's listening socket. Binds loopback unless told otherwise; refuses to listen
    elsewhere without a key."""

    def __init__(self, address: str, key: bytes, tls: Tls | None = None) -> None:
        host, port = parse_address(address)
        if not key and tls is None and not is_loopback(host):
            raise TransportError(f"listening on {host} needs a key (--key-file) or TLS: anyone who "
                                 f"can reach it could send a guest")
        self.key = key
        self._tls = tls.context(server=True) if tls else None
        try:
            self.sock = socket.create_server((host, port), reuse_port=False)
        except OSError as e:  # typed, with the facts: exit status 4 (transport), never a raw errno
            raise CannotListen(address, "the address is in use (another process listens there)"
                               if e.errno == errno.EADDRINUSE else e.strerror or str(e)) from None
        self.address = f"{host}:{self.sock.getsockname()[1]}"

    def accept(self, timeout: float | None = None) -> Connection:
        """The next connection, authenticated (TLS, then the key's challenge)."""
        sock, peer = self.accept_raw(timeout)
        return self.secure(sock, peer)

    def accept_raw(self, timeout: float | None = None) -> tuple[socket.socket, str]:
        """The next connection as it comes, before TLS or authentication (for a server that
        authenticates on threads of its own: `secure`)."""
        self.sock.settimeout(timeout)
        try:
            sock, peer = self.sock.accept()
        except TimeoutError as e:
            raise TransportError(f"no source connected to {self.address} within {timeout}s") from e
        except OSError as e:
            raise TransportError(f"accepting on {self.address}: {e}") from e
        return sock, f"{peer[0]}:{peer[1]}"

    def secure(self, sock: socket.socket, peer: str, timeout: float = 10.0) -> Connection:
        """TLS (if configured) and the key's challenge on an accepted socket; nothing else is
        read before. Closes it and raises `TransportError` if either fails."""
        if self._tls is not None:
            try:
                sock.settimeout(timeout)
                sock = self._tls.wrap_socket(sock, server_side=True)
            except (OSError, ssl.SSLError) as e:
                sock.close()
                raise TransportError(f"TLS with {peer} failed: {e}") from e
        conn = Connection(sock, peer)
        try:
            conn.challenge(self.key, timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        self.sock.close()
