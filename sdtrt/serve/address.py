"""Where `sdtrt serve` listens: the host and port checked before any model loads, one clear line each."""

from __future__ import annotations

import socket

from sdtrt.engine.errors import InvalidInputError


def check_address(host: str, port: int) -> None:
    """One InvalidInputError unless a server can listen on ``host``:``port``: a port from 1 to 65535 (the kernel
    would take 99999 as 34463), a host that resolves to an address of this machine, and the port free there."""
    if not 1 <= port <= 65535:
        raise InvalidInputError(f"--port {port} is not a TCP port (1 to 65535)")
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise InvalidInputError(f"--host {host}: not an address of this machine ({exc})") from None
    family, kind, proto, _, address = addresses[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no bar
        try:
            probe.bind(address)
        except OSError as exc:
            raise InvalidInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
