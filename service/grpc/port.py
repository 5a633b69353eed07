"""The gRPC port, held by the supervisor for its workers (imports no gRPC).

Every ingress worker runs its own gRPC server on the one port, with ``SO_REUSEPORT`` (gRPC's
default on Linux), and the kernel spreads new connections over them. ``SO_REUSEPORT`` would
also let a second service of the same user join the port silently, so the supervisor first
binds it plainly (refused if anything holds it), then keeps a non-listening ``SO_REUSEPORT``
socket on it until the workers have stopped: the port stays this service's meanwhile.
"""

from __future__ import annotations

import socket


def reserve(host: str, port: int) -> socket.socket:
    """The reservation socket for ``host:port``; OSError when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, port))  # no SO_REUSEPORT: fails if anyone holds the port
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def target(host: str, port: int) -> str:
    """``host:port`` as gRPC and its clients write it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
