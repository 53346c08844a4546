"""Small networking helpers shared by dev launchers and test fixtures."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that nothing listens on right now.

    The kernel picks the port (bind to port 0), so two callers never collide with each other the way a
    hand-rolled "try 6380, 6381, ..." loop would. The socket is closed before returning, so another
    process *can* still grab the port before ours binds it: callers that start a server on it should
    retry with a new port when the bind fails (``RedisServer`` does).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
